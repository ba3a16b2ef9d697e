"""Exporters from diffusers pipelines to deployable formats (ONNX, ORT, Core ML), each checked against PyTorch."""
