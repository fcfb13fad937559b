"""Benchmark harnesses: contenders measured in their own processes, outside the runtime they measure."""
