"""swiftdiffusion: Stable Diffusion serving with ControlNets and LoRAs on Triton Inference Server."""
