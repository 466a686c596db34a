"""Running Triton Inference Server and perf_analyzer from this project, with or without NVIDIA's container."""
