"""Textual inversion (``embedding_manager2.EmbeddingManager``, PANDA_SPEC.md section 3(a)): each name
("class+defect") owns 4 learned vectors of the text encoder's width; the "*" of the prompt "Anomaly *" is replaced
by them in the token-embedding sequence (before the positional embeddings), the rest shifts right and the row is
cut to its length (77)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

PLACEHOLDER = "*"
PROMPT = "Anomaly *"
VECTORS_PER_TOKEN = 4
MAX_LENGTH = 77  # the LDMBert context length; the tokenizer truncates and pads to it


def splice(tokens: Tensor, embedded: Tensor, vectors: Tensor, placeholder_id: int
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Insert ``vectors[b]`` at each placeholder of row b, as the release does (placeholders taken right to left;
    every row cut back to n). tokens [B, n] int64, embedded [B, n, H], vectors [B, k, H] ->
    (tokens [B, n] with the k placeholder ids, embedded [B, n, H], position [B, 2] float = [col, col + k] of the
    leftmost placeholder, zeros in a row without one). Out of place (gradients reach ``vectors``).
    A batch without any placeholder raises ValueError (the release: UnboundLocalError)."""
    n, k = tokens.shape[1], vectors.shape[1]
    if not bool((tokens == placeholder_id).any()):
        raise ValueError(f"no placeholder token {placeholder_id} in the batch to splice the learned vectors into")
    token_rows, embed_rows = [], []
    position = torch.zeros(tokens.shape[0], 2)
    repeated = tokens.new_full((k,), placeholder_id)
    for b in range(tokens.shape[0]):
        row_tokens, row_embed = tokens[b], embedded[b]
        for col in sorted(torch.nonzero(row_tokens == placeholder_id).flatten().tolist(), reverse=True):
            row_tokens = torch.cat([row_tokens[:col], repeated, row_tokens[col + 1:]])[:n]
            row_embed = torch.cat([row_embed[:col], vectors[b].to(row_embed.dtype), row_embed[col + 1:]])[:n]
            position[b, 0], position[b, 1] = col, col + k
        token_rows.append(row_tokens)
        embed_rows.append(row_embed)
    return torch.stack(token_rows), torch.stack(embed_rows), position


class TextualInversion(nn.Module):
    """Per name a [4, H] parameter, initialised as 4 copies of the init word's token embedding.
    Stored as a ParameterList (names may hold any character); ``vectors(names)`` -> [B, 4, H]."""

    def __init__(self, names: list[str], init_embeddings: dict[str, Tensor]):
        super().__init__()
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"textual inversion needs distinct names, got {names}")
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.params = nn.ParameterList(
            nn.Parameter(init_embeddings[name].detach().float().reshape(1, -1).repeat(VECTORS_PER_TOKEN, 1).clone())
            for name in self.names)

    def vectors(self, names: list[str]) -> Tensor:
        """The learned vectors of each batch item's name: [B, 4, H]."""
        unknown = sorted(set(names) - set(self.index))
        if unknown:
            raise KeyError(f"no textual-inversion vectors for {unknown}; this model has {self.names}")
        return torch.stack([self.params[self.index[name]] for name in names])
