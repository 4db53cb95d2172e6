"""From ``Interactions`` to training and evaluation tensors.

``build_dataset`` filters (rating threshold, iterative k-core), remaps ids
(items 1..num_items with 0 = padding, users 0..num_users-1), orders each
user's interactions by time (stable) and splits them:

- ``loo``: per user the last item is the test target, the second last the
  valid target, the rest train (users with < 3 interactions: all train).
- ``time``: absolute time; interactions with timestamp >= t1 are test
  targets, in [t0, t1) valid targets, earlier ones train.
- ``predefined``: the source's own train/valid/test label per row
  (Amazon 2023); rows with a given ``history`` use that history.

Every sample is (history, target) where the history is a slice
``flat[start:end]`` of one flat item array; ``TrainSamples.gather`` builds a
batch of left-padded ``[n, max_len]`` histories with one fancy-indexing op.
"""

from __future__ import annotations

import warnings

from array import array
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from .interactions import Interactions, as_ids

__all__ = ["build_dataset", "check_usable", "SequenceDataset", "TrainSamples", "SequenceSamples", "EvalSamples",
           "k_core_filter", "gather_histories"]

SPLITS = ("auto", "loo", "time", "predefined")


def gather_histories(flat: torch.Tensor, start: torch.Tensor, end: torch.Tensor, max_len: int) -> torch.Tensor:
    """``out[i]`` = ``flat[start[i]:end[i]]`` truncated to its last ``max_len``
    items and left-padded with 0: ``[n, max_len]`` int64."""
    n = end.shape[0]
    pos = end.unsqueeze(1) - max_len + torch.arange(max_len, dtype=end.dtype, device=end.device)
    pad = pos < start.unsqueeze(1)
    out = flat.index_select(0, pos.clamp_min_(0).view(-1)).view(n, max_len)
    return out.masked_fill_(pad, 0)


class TrainSamples(torch.utils.data.Dataset):
    """Training samples (history -> next item) over one flat item array.

    Sample ``i`` has history ``flat[start[i]:end[i]]`` and target ``target[i]``.
    For sequence splits these are all prefixes S_1..t -> v_{t+1} (t >= 1) of
    every user's training sequence.
    """

    def __init__(self, flat: torch.Tensor, start: torch.Tensor, end: torch.Tensor, target: torch.Tensor,
                 max_len: int, user: Optional[torch.Tensor] = None):
        self.flat, self.start, self.end, self.target = flat, start, end, target
        self.user = user
        self.max_len = max_len

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def gather(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """(item_seq ``[n, max_len]`` left-padded, target ``[n]``) for a
        LongTensor (or array / list) of sample indices; vectorised."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return gather_histories(self.flat, self.start[idx], self.end[idx], self.max_len), self.target[idx]

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"TrainSamples index: expected -{n} <= i < {n}, got {i}")
            seq, tgt = self.gather(torch.tensor([int(i) % n]))
            return seq[0], tgt[0]
        return self.gather(i)

    def lengths(self) -> torch.Tensor:
        """History length of each sample (at most ``max_len``)."""
        return torch.clamp(self.end - self.start, max=self.max_len)

    def to(self, device) -> "TrainSamples":
        """A copy whose tensors live on ``device`` (then ``gather`` runs there)."""
        mv = (lambda t: None if t is None else t.to(device))
        return TrainSamples(mv(self.flat), mv(self.start), mv(self.end), mv(self.target), self.max_len,
                            user=mv(self.user))

    def batches(self, batch_size: int, shuffle: bool = True, generator: Optional[torch.Generator] = None,
                drop_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over (item_seq, target) batches of one epoch."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.target.device)
        stop = n - n % batch_size if drop_last else n
        for b in range(0, stop, batch_size):
            yield self.gather(order[b:b + batch_size])


class SequenceSamples:
    """Training sequences for the sequence mode (``train.samples: sequence``):
    each sample is a window of a user's training sequence, input items
    ``flat[start:end-1]`` (left-padded to ``max_len``) and at every position the
    next item as its target, so one encoder pass trains on every prefix.

    Built from the prefix samples of a :class:`TrainSamples` by
    :meth:`from_prefix_samples`: the same targets, each predicted exactly once.
    A sequence of ``n <= max_len + 1`` items is one window (every target then
    sees the same history as its prefix sample). A longer one is cut into
    windows of ``max_len + 1`` items starting every ``stride = max_len -
    max_len // 2`` items (the last one may be shorter); in each window the
    targets an earlier window already predicts are ignored (target 0), so a
    target sees at least ``max_len // 2 + 1`` items of history (its prefix
    sample sees ``min(t, max_len)``).
    """

    def __init__(self, flat: torch.Tensor, start: torch.Tensor, end: torch.Tensor, first_target: torch.Tensor,
                 max_len: int, user: Optional[torch.Tensor] = None):
        self.flat, self.start, self.end, self.first_target = flat, start, end, first_target
        self.user = user
        self.max_len = max_len

    @classmethod
    def from_prefix_samples(cls, samples: TrainSamples) -> "SequenceSamples":
        """Group the prefix samples into per-user sequences and cut windows.

        Sample i is ``flat[start_i:end_i] -> target_i``; it continues sample
        i-1 when the users match and ``end_i = end_{i-1} + 1``; a sequence needs
        ``target_i = flat[end_i]`` (the next item of the flat array). Data with
        given histories (Amazon 2023) has no such sequences: an error.
        """
        n, max_len = len(samples), samples.max_len
        if n == 0:
            raise ValueError("samples: expected training samples, got none")
        start, end = samples.start.cpu().numpy(), samples.end.cpu().numpy()
        flat, target = samples.flat.cpu(), samples.target.cpu().numpy()
        in_flat = end < flat.shape[0]
        if not in_flat.all() or not (flat.numpy()[np.minimum(end, flat.shape[0] - 1)] == target).all():
            raise ValueError("train.samples: 'sequence' needs training samples that are the prefixes of per-user "
                             "sequences (target = the item after the history), but this dataset's histories are "
                             "given per sample (e.g. Amazon 2023); use train.samples=prefix")
        user = samples.user.cpu().numpy() if samples.user is not None else np.zeros(n, dtype=np.int64)
        new = np.ones(n, dtype=bool)
        new[1:] = (user[1:] != user[:-1]) | (end[1:] != end[:-1] + 1)
        seq_id = np.cumsum(new) - 1
        heads = np.flatnonzero(new)
        s_start = start[heads]  # the first sample's history is the untruncated start
        s_stop = np.append(end[heads[1:] - 1], end[-1]) + 1  # items flat[s_start:s_stop], targets from s_start+1
        s_user = user[heads]
        del seq_id
        stride = max_len - max_len // 2
        lengths = s_stop - s_start
        counts = np.where(lengths <= max_len + 1, 1, 1 + -(-(lengths - max_len - 1) // stride))
        owner = np.repeat(np.arange(len(heads)), counts)
        k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        w_start = s_start[owner] + k * stride
        w_end = np.minimum(w_start + max_len + 1, s_stop[owner])
        first = np.where(k == 0, w_start + 1, w_start + max_len + 1 - stride)  # first flat index predicted here
        as_t = (lambda a: torch.from_numpy(a.astype(np.int64)))
        return cls(samples.flat, as_t(w_start), as_t(w_end), as_t(first), max_len, user=as_t(s_user[owner]))

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def num_targets(self) -> int:
        """How many (prefix, next item) targets the windows hold in all."""
        return int((self.end - self.first_target).sum())

    def gather(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """(item_seq ``[n, max_len]`` left-padded inputs, target ``[n, max_len]``
        the next item after each position, 0 = none) for sample ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        start, end, first = self.start[idx], self.end[idx], self.first_target[idx]
        item_seq = gather_histories(self.flat, start, end - 1, self.max_len)
        pos = end.unsqueeze(1) - self.max_len + torch.arange(self.max_len, dtype=end.dtype, device=end.device)
        target = self.flat.index_select(0, pos.clamp(0, self.flat.shape[0] - 1).view(-1)).view_as(pos)
        return item_seq, target.masked_fill_(pos < first.unsqueeze(1), 0)

    def __getitem__(self, i):
        seq, tgt = self.gather(torch.tensor([int(i) % len(self)]))
        return seq[0], tgt[0]

    def to(self, device) -> "SequenceSamples":
        mv = (lambda t: None if t is None else t.to(device))
        return SequenceSamples(mv(self.flat), mv(self.start), mv(self.end), mv(self.first_target), self.max_len,
                               user=mv(self.user))


@dataclass
class EvalSamples:
    """Evaluation samples: ``item_seq [U, max_len]`` (left-padded), ``target [U]``,
    ``user [U]`` (internal user ids; a user may have several samples in a time split)."""

    item_seq: torch.Tensor
    target: torch.Tensor
    user: torch.Tensor

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def __getitem__(self, i):
        return self.item_seq[i], self.target[i]

    def batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Iterate in order over (item_seq, target, user) batches."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        for b in range(0, len(self), batch_size):
            yield self.item_seq[b:b + batch_size], self.target[b:b + batch_size], self.user[b:b + batch_size]

    def to(self, device) -> "EvalSamples":
        return EvalSamples(self.item_seq.to(device), self.target.to(device), self.user.to(device))


class SequenceDataset:
    """A split dataset: ``train`` (``TrainSamples``), ``valid`` / ``test``
    (``EvalSamples``), item and user id maps and titles."""

    def __init__(self, *, name: str, max_len: int, split: str, item_raw_ids: list, user_raw_ids: list,
                 item_titles: list, train: TrainSamples, valid: EvalSamples, test: EvalSamples,
                 item_popularity: np.ndarray, seq_lengths: np.ndarray, num_interactions: int):
        self.name, self.max_len, self.split = name, max_len, split
        self.item_raw_ids, self.user_raw_ids, self.item_titles = item_raw_ids, user_raw_ids, item_titles
        self.train, self.valid, self.test = train, valid, test
        self.item_popularity = item_popularity
        self.seq_lengths = seq_lengths
        self.num_interactions = num_interactions
        self._index = {raw: i for i, raw in enumerate(item_raw_ids) if i > 0}

    @property
    def num_items(self) -> int:
        return len(self.item_raw_ids) - 1

    @property
    def num_users(self) -> int:
        return len(self.user_raw_ids)

    def item_index(self, raw_id) -> int:
        """Internal id (1..num_items) of a raw item id; "12" and 12 both work
        for integer ids. KeyError when unknown."""
        if raw_id in self._index:
            return self._index[raw_id]
        for conv in (str, int):
            try:
                key = conv(raw_id)
            except (TypeError, ValueError):
                continue
            if key in self._index:
                return self._index[key]
        raise KeyError(f"item_index: raw item id {raw_id!r} is not in dataset {self.name!r} "
                       f"({self.num_items} items)")

    def summary(self) -> dict:
        """Counts and sequence-length statistics (lengths = kept interactions per user)."""
        lens = self.seq_lengths
        n_u, n_i = self.num_users, self.num_items
        return {
            "name": self.name, "split": self.split, "max_len": self.max_len,
            "users": n_u, "items": n_i, "interactions": int(self.num_interactions),
            "train_samples": len(self.train), "valid_samples": len(self.valid), "test_samples": len(self.test),
            "valid_users": int(torch.unique(self.valid.user).numel()),
            "test_users": int(torch.unique(self.test.user).numel()),
            "sparsity": float(1.0 - self.num_interactions / (n_u * n_i)) if n_u and n_i else float("nan"),
            "avg_length": float(lens.mean()) if len(lens) else 0.0,
            "median_length": float(np.median(lens)) if len(lens) else 0.0,
            "max_length": int(lens.max()) if len(lens) else 0,
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"SequenceDataset({s['name']!r}, split={s['split']!r}, users={s['users']}, items={s['items']}, "
                f"train={s['train_samples']}, valid={s['valid_samples']}, test={s['test_samples']})")


# ----------------------------------------------------------------------------- filters

def k_core_filter(user_idx: np.ndarray, item_idx: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of rows kept by iterative k-core filtering (every kept user
    and item has >= k kept interactions)."""
    keep = np.ones(len(user_idx), dtype=bool)
    nu, ni = (int(user_idx.max()) + 1, int(item_idx.max()) + 1) if len(user_idx) else (0, 0)
    while True:
        uc = np.bincount(user_idx[keep], minlength=nu)
        ic = np.bincount(item_idx[keep], minlength=ni)
        new = keep & (uc[user_idx] >= k) & (ic[item_idx] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _titles(raw_ids: list, titles: dict) -> list:
    return ["<pad>"] + [titles.get(r, "") for r in raw_ids[1:]]


def _eval(flat: torch.Tensor, start: np.ndarray, end: np.ndarray, target: np.ndarray, user: np.ndarray,
          max_len: int) -> EvalSamples:
    s, e = torch.from_numpy(start.astype(np.int64)), torch.from_numpy(end.astype(np.int64))
    return EvalSamples(item_seq=gather_histories(flat, s, e, max_len),
                       target=torch.from_numpy(target.astype(np.int64)),
                       user=torch.from_numpy(user.astype(np.int64)))


def _time_bounds(split_time, ts: np.ndarray) -> Tuple[float, float]:
    if split_time is None or len(split_time) != 2:
        raise ValueError(f"split_time: expected two timestamps (t_valid, t_test) or two quantiles in (0, 1) "
                         f"for split='time', got {split_time!r}")
    a, b = (float(x) for x in split_time)
    if all(isinstance(x, float) for x in split_time) and 0 < a < 1 and 0 < b < 1:
        a, b = (float(np.quantile(ts, q)) for q in (a, b))
    if a > b:
        raise ValueError(f"split_time: expected t_valid <= t_test, got {split_time!r}")
    return a, b


# ----------------------------------------------------------------------------- build

def build_dataset(inter: Interactions, max_len: int = 50, split: str = "auto", min_rating: Optional[float] = None,
                  k_core: Optional[int] = None, split_time: Optional[Sequence] = None) -> SequenceDataset:
    """Filter, remap and split ``inter`` (see the module docstring).

    Args:
        max_len: histories are truncated to their last ``max_len`` items.
        split: "loo", "time", "predefined", or "auto" = "predefined" when the
            data has a predefined split (Amazon 2023), else "loo". "time" on
            data with a predefined split uses the predefined split.
        min_rating: keep rows with rating > min_rating (needs a rating column).
        k_core: iterative k-core on users and items (not with given histories).
        split_time: for "time": (t_valid, t_test) timestamps, or quantiles when
            both are floats in (0, 1).
    """
    return _build_dataset(inter, max_len, split, min_rating, k_core, split_time)


def check_usable(ds: SequenceDataset, source: str, parts: Sequence[str] = ("train", "valid", "test")) -> None:
    """Raise ``ValueError`` naming ``source`` if ``ds`` yields no training samples
    or no evaluation users among ``parts``; warn with a count of the users with
    a single interaction (they give no sample: dropped). The trainer and the
    command line call this before any work."""
    where = f"{source} (split={ds.split!r})"
    if "train" in parts and len(ds.train) == 0:
        raise ValueError(f"data: {where} yields no training samples (every user has fewer than 2 training "
                         f"interactions); use a dataset with longer histories")
    for part in ("valid", "test"):
        if part in parts and len(getattr(ds, part).target) == 0:
            raise ValueError(f"data: {where} yields no {part} users (leave-one-out needs users with >= 3 "
                             f"interactions; a time split needs interactions after its split_time)")
    single = int((np.asarray(getattr(ds, "seq_lengths", [])) == 1).sum()) if "train" in parts else 0
    if single and ds.split != "predefined":
        warnings.warn(f"data: {single} user(s) of {where} have a single interaction and give no sample "
                      "(dropped)", stacklevel=3)


def _build_dataset(inter, max_len, split, min_rating, k_core, split_time) -> SequenceDataset:
    """``build_dataset`` without the final usability checks."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
    if len(inter) == 0:
        raise ValueError(f"inter: expected interactions, got none in {inter.name!r} ({inter.fmt or 'no format'}; "
                         f"a metadata-only folder?)")
    if min_rating is not None:
        if inter.rating is None:
            raise ValueError(f"min_rating: data {inter.name!r} has no rating column, got min_rating={min_rating}")
        inter = inter.subset(inter.rating > min_rating)
        if len(inter) == 0:
            raise ValueError(f"min_rating: no interaction has a rating > {min_rating}")
    predefined = inter.predefined_split is not None
    if split == "auto":
        split = "predefined" if predefined else "loo"
    elif split == "time" and predefined:
        split = "predefined"
    if split == "predefined" and not predefined:
        raise ValueError(f"split: 'predefined' needs data with a predefined split (amazon2023), got {inter.name!r}")
    if split == "loo" and inter.history is not None:
        raise ValueError("split: data with given histories (amazon2023) keeps its predefined split; "
                         "expected 'auto', 'time' or 'predefined', got 'loo'")
    if k_core is not None:
        if inter.history is not None:
            raise ValueError("k_core: cannot re-filter data whose histories are given (amazon2023); got "
                             f"k_core={k_core}")
        if int(k_core) < 1:
            raise ValueError(f"k_core: expected an int >= 1, got {k_core!r}")
    if inter.history is not None:
        return _build_from_histories(inter, max_len)

    users, uidx = np.unique(inter.user, return_inverse=True)
    items, iidx = np.unique(inter.item, return_inverse=True)
    uidx, iidx = uidx.reshape(-1), iidx.reshape(-1)
    if k_core is not None and len(inter):
        keep = k_core_filter(uidx, iidx, int(k_core))
        if not keep.any():
            raise ValueError(f"k_core: no user and item keep >= {k_core} interactions in {inter.name!r}")
        inter = inter.subset(keep)
        users, uidx = np.unique(inter.user, return_inverse=True)
        items, iidx = np.unique(inter.item, return_inverse=True)
        uidx, iidx = uidx.reshape(-1), iidx.reshape(-1)
    iidx = iidx + 1  # 0 = padding

    # Stable order: by user, then time, ties in input order.
    order = np.argsort(inter.timestamp, kind="stable")
    order = order[np.argsort(uidx[order], kind="stable")]
    u_s, i_s, t_s = uidx[order], iidx[order], inter.timestamp[order]
    counts = np.bincount(u_s, minlength=len(users))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pos = np.arange(len(u_s)) - offsets[u_s]  # position within the user's sequence
    n_u = counts[u_s]

    if split == "loo":
        label = np.zeros(len(u_s), dtype=np.int8)  # 0 train, 1 valid, 2 test
        eligible = n_u >= 3
        label[eligible & (pos == n_u - 1)] = 2
        label[eligible & (pos == n_u - 2)] = 1
    elif split == "time":
        if not inter.has_timestamps:
            raise ValueError(f"split: 'time' needs timestamps, but data {inter.name!r} ({inter.fmt}) only has the "
                             f"line order; got split='time'")
        t0, t1 = _time_bounds(split_time, inter.timestamp)
        label = np.where(t_s >= t1, 2, np.where(t_s >= t0, 1, 0)).astype(np.int8)
    else:
        lab = np.asarray(inter.predefined_split)[order]
        label = np.select([lab == "train", lab == "valid", lab == "test"], [0, 1, 2], default=-1).astype(np.int8)
        if (label < 0).any():
            bad = lab[label < 0][0]
            raise ValueError(f"predefined_split: expected 'train', 'valid' or 'test', got {bad!r}")

    flat = torch.from_numpy(i_s.astype(np.int64))
    start_all = offsets[u_s]
    has_hist = pos >= 1

    def select(lbl):
        return np.flatnonzero((label == lbl) & has_hist)

    tr = select(0)  # with a time split the train rows come first, so histories hold only train items
    train = TrainSamples(flat, torch.from_numpy(np.maximum(start_all[tr], tr - max_len).astype(np.int64)),
                         torch.from_numpy(tr.astype(np.int64)), flat[torch.from_numpy(tr.astype(np.int64))],
                         max_len, user=torch.from_numpy(u_s[tr].astype(np.int64)))
    va, te = select(1), select(2)
    valid = _eval(flat, start_all[va], va, i_s[va], u_s[va], max_len)
    test = _eval(flat, start_all[te], te, i_s[te], u_s[te], max_len)
    popularity = np.bincount(i_s[label == 0], minlength=len(items) + 1)
    raw = [None] + items.tolist()
    return SequenceDataset(name=inter.name, max_len=max_len, split=split, item_raw_ids=raw,
                           user_raw_ids=users.tolist(), item_titles=_titles(raw, inter.item_titles),
                           train=train, valid=valid, test=test, item_popularity=popularity,
                           seq_lengths=counts, num_interactions=len(u_s))


def _build_from_histories(inter: Interactions, max_len: int) -> SequenceDataset:
    """Predefined split with a given history per row (Amazon 2023): every row
    is one sample; its history is the given one (last ``max_len`` items)."""
    n = len(inter)
    vocab: dict = {}  # raw id (as text) -> provisional id, in order of first sight
    target = np.fromiter((vocab.setdefault(r, len(vocab)) for r in inter.item.astype(str).tolist()),
                         dtype=np.int64, count=n)
    chunks = array("q")
    lens = np.empty(n, dtype=np.int64)
    for j, h in enumerate(inter.history):
        toks = h.split()[-max_len:] if h else []
        lens[j] = len(toks)
        chunks.extend([vocab.setdefault(t, len(vocab)) for t in toks])
    hist_ids = np.frombuffer(chunks, dtype=np.int64) if len(chunks) else np.zeros(0, dtype=np.int64)
    # Final ids: raw ids sorted (as ints when they all are), from 1.
    items = as_ids(list(vocab))
    order = np.argsort(items, kind="stable")
    new_id = np.empty(len(items), dtype=np.int64)
    new_id[order] = np.arange(1, len(items) + 1)
    items = items[order]
    target, hist_ids = new_id[target], new_id[hist_ids]
    users, uidx = np.unique(inter.user, return_inverse=True)
    flat = torch.from_numpy(hist_ids)
    end = np.cumsum(lens)
    start = end - lens
    lab = np.asarray(inter.predefined_split)
    uidx = uidx.reshape(-1)
    tr, va, te = (np.flatnonzero((lab == s) & (lens > 0)) for s in ("train", "valid", "test"))
    # Chronological order of training samples is not needed; keep file order.
    train = TrainSamples(flat, torch.from_numpy(start[tr]), torch.from_numpy(end[tr]),
                         torch.from_numpy(target[tr].astype(np.int64)), max_len,
                         user=torch.from_numpy(uidx[tr].astype(np.int64)))
    valid = _eval(flat, start[va], end[va], target[va], uidx[va], max_len)
    test = _eval(flat, start[te], end[te], target[te], uidx[te], max_len)
    popularity = np.bincount(target[tr], minlength=len(items) + 1)
    raw = [None] + items.tolist()
    seq_lengths = np.bincount(uidx, minlength=len(users))
    return SequenceDataset(name=inter.name, max_len=max_len, split="predefined", item_raw_ids=raw,
                           user_raw_ids=users.tolist(), item_titles=_titles(raw, inter.item_titles),
                           train=train, valid=valid, test=test, item_popularity=popularity,
                           seq_lengths=seq_lengths, num_interactions=n)
