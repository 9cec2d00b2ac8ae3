"""The process around training: CPU threads and memory, device set-up, torch.distributed, NVTX profiling."""
