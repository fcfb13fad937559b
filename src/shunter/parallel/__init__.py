"""Expert parallelism on torch.distributed, and an emulated cluster to run it on."""
