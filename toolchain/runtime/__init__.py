"""Everything that runs a text-to-image pipeline, whatever the runtime: one sampler (the scheduler
loop with classifier-free guidance, and the k-step generator schedule) and one backend per runtime.

Layer 2 of the house: imports only `toolchain.models` and libraries, so exporters, attacks,
training and the measurement harness can all sample through it.
"""
