"""Tokenize documents with ``datasets``, pack them into fixed-length sequences, split off eval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from gearshift.errors import DataError


class PackedSequences(TorchDataset):
    """Fixed-length token sequences; item ``i`` is ``{"input_ids": LongTensor[seq_len]}``."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index]}


@dataclass
class PackedData:
    train: PackedSequences
    eval: PackedSequences | None
    num_tokens: int


def pack_documents(
    documents: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    eval_fraction: float = 0.05,
    max_eval_sequences: int | None = None,
    seed: int = 0,
) -> PackedData:
    """Tokenize, join documents with EOS, cut into ``seq_len`` chunks and hold some out.

    The held-out split is a seeded choice of whole sequences, so it is the same on every run
    with the same seed and data.
    """
    ds = Dataset.from_dict({"text": list(documents)})
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        flat = [t for ids in batch["input_ids"] for t in ids]
        usable = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, usable, seq_len)]}

    # One batch for grouping keeps every token (per-batch grouping would drop a remainder per
    # batch); the corpora this is meant for fit in memory.
    ds = ds.map(tokenize, batched=True, remove_columns=["text"])
    num_tokens = sum(len(x) for x in ds["input_ids"])
    ds = ds.map(group, batched=True, batch_size=None)
    if len(ds) == 0:
        raise DataError(
            f"the data holds {num_tokens} tokens, fewer than one sequence of data.seq_len="
            f"{seq_len}; add data or lower data.seq_len"
        )
    ids = torch.tensor(ds["input_ids"], dtype=torch.long)
    n_eval = int(round(len(ids) * eval_fraction)) if eval_fraction > 0 else 0
    if max_eval_sequences is not None:
        n_eval = min(n_eval, max_eval_sequences)
    if eval_fraction > 0 and n_eval == 0 and len(ids) > 1:
        n_eval = 1
    if n_eval >= len(ids):
        raise DataError(
            f"only {len(ids)} sequences of {seq_len} tokens; nothing left to train on after "
            f"holding out data.eval_fraction={eval_fraction}. Add data or lower data.seq_len"
        )
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    eval_idx, train_idx = perm[:n_eval].sort().values, perm[n_eval:].sort().values
    return PackedData(
        train=PackedSequences(ids[train_idx]),
        eval=PackedSequences(ids[eval_idx]) if n_eval else None,
        num_tokens=num_tokens,
    )
