"""Everything that runs a text-to-image pipeline, whatever the runtime: one sampler (the scheduler
loop with classifier-free guidance, and the k-step generator schedule) and one backend per runtime.

sampler.py: the loop, `sample(backend, prompts, seed, ...)`, and the `Backend` a runtime provides;
schedule.py: the k-step generator schedule and the diffusion maths; pytorch.py: `diffusers_generator`
(a diffusers pipeline); ort.py: `OrtPipeline` / `ort_generator` (an ONNX or ORT-format folder).

Layer 2 of the house: imports only `toolchain.models` and libraries, so exporters, attacks,
training and the measurement harness can all sample through it.
"""
