"""The one network model every planner, simulator and benchmark uses."""
