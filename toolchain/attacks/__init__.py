"""White-box attacks on concept erasure: a discrete prefix-prompt attack (`prefix`), its
continuous soft-prompt form (`soft`) and concept inversion (`inversion`); `concept` runs them
against one erased concept and reports their success rates.

All need gradients, so they run on PyTorch models (a diffusers pipeline's `text_encoder`,
`tokenizer` and `unet`); the prompts the prefix attack finds are plain strings, so an exported
model can be measured with them too (transfer). Used by the robust unlearning option (an inner
attack during training) and by the benchmark stage (measurement).
"""

from toolchain.attacks.concept import AttackReport, attack_concept, concept_latents, transfer_rate
from toolchain.attacks.encoder import PromptEncoder
from toolchain.attacks.inversion import concept_inversion, generate_from_embeddings
from toolchain.attacks.prefix import PrefixAttack, attack_batch, prefix_attack
from toolchain.attacks.soft import soft_prefix_attack

__all__ = [
    "AttackReport",
    "PrefixAttack",
    "PromptEncoder",
    "attack_batch",
    "attack_concept",
    "concept_inversion",
    "concept_latents",
    "generate_from_embeddings",
    "prefix_attack",
    "soft_prefix_attack",
    "transfer_rate",
]
