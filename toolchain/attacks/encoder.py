"""Token-level access to a CLIP text encoder, shared by every attack: prompts -> token ids ->
token embeddings -> text embeddings, with k prefix token embeddings inserted after the start token.

The attacks' vocabulary is every whole-word token ("...</w>") that round-trips through the
tokenizer, so a prefix found as tokens decodes to a string that encodes back to the same tokens
and can be handed to any model as plain text.
"""

from __future__ import annotations

import torch


class PromptEncoder:
    """Token-level access to a CLIP text encoder: prompts -> token ids -> token embeddings ->
    text embeddings, with k prefix token embeddings inserted after the start token.

    L = sequence length (tokenizer max length, capped by the encoder's positions), D_tok = token
    embedding width, D = text embedding width (equal for CLIP).
    """

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        positions = getattr(text_encoder.config, "max_position_embeddings", tokenizer.model_max_length)
        self.length = min(int(tokenizer.model_max_length), int(positions))
        self.candidates = self._word_tokens()

    @property
    def table(self) -> torch.Tensor:
        """(V, D_tok) the frozen token embedding table."""
        return self.text_encoder.get_input_embeddings().weight

    def _word_tokens(self) -> torch.Tensor:
        """Ids of whole-word tokens whose decoded text encodes back to exactly that token."""
        special = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        keep = []
        for token, index in self.tokenizer.get_vocab().items():
            if index in special or not token.endswith("</w>"):
                continue
            text = self.tokenizer.decode([index]).strip()
            if text and self.tokenizer(text, add_special_tokens=False).input_ids == [index]:
                keep.append(index)
        if not keep:
            raise ValueError("the tokenizer has no whole-word token that round-trips; the prefix attack needs some")
        return torch.tensor(sorted(keep), dtype=torch.long)

    def ids(self, prompts: list[str]) -> torch.Tensor:
        """(N, L) token ids, padded to L."""
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        ).input_ids

    def with_prefix(self, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """(N, L, D_tok) token embeddings of [BOS, prefix (N, k, D_tok), prompt tokens...], cut to
        L tokens; the prompt's own end token is kept (its last words give way first)."""
        device = self.table.device
        ids = ids.to(device)
        k = prefix.shape[1]
        words = self.table[ids]  # (N, L, D_tok)
        eos = self.tokenizer.eos_token_id
        rows = []
        end = self.table[eos].view(1, -1)
        for i in range(len(ids)):
            ends = (ids[i] == eos).nonzero()
            n = int(ends[0]) if len(ends) else ids.shape[1]  # first end token
            body = words[i, 1:n][: max(0, self.length - 2 - k)]  # prompt words without BOS
            tail = words[i, n:][: self.length - 1 - k - len(body)]  # EOS and padding
            if len(tail) == 0:
                tail = end
            row = torch.cat([words[i, :1], prefix[i].to(words.dtype), body, tail])
            rows.append(torch.cat([row, end.expand(self.length - len(row), -1)]))
        return torch.stack(rows)

    def encode_embeddings(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, L, D_tok) -> (N, L, D) last hidden state, as `text_encoder(ids)[0]` computes it."""
        from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

        model = self.text_encoder.text_model
        hidden = model.embeddings(inputs_embeds=token_embeddings)
        mask = _create_4d_causal_attention_mask(token_embeddings.shape[:2], hidden.dtype, device=hidden.device)
        out = model.encoder(inputs_embeds=hidden, causal_attention_mask=mask).last_hidden_state
        return model.final_layer_norm(out)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(N, L, D) text embeddings of plain prompts (no gradient)."""
        with torch.no_grad():
            return self.text_encoder(self.ids(prompts).to(self.table.device))[0]

    def decode(self, prefix_ids: torch.Tensor) -> list[str]:
        """(N, k) -> the prefixes as text."""
        return [" ".join(self.tokenizer.decode([int(i)]).strip() for i in row) for row in prefix_ids]
