"""build_dataset: splits checked by hand, prefix samples, filters, id maps,
and the Amazon 2023 reader with the PLR paper's filters on fixture CSVs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from plr.data import (DataFormatError, Interactions, build_dataset, detect_format, k_core_filter,
                      read_interactions)


def make(rows, rating=None, name="toy"):
    u, i, t = zip(*rows)
    return Interactions(user=np.array(u), item=np.array(i), timestamp=np.array(t, dtype=float),
                        rating=None if rating is None else np.array(rating, dtype=float), name=name)


def ids(ds, *raw):
    return [ds.item_index(r) for r in raw]


def padded(ds, *raw, max_len):
    seq = ids(ds, *raw)[-max_len:]
    return [0] * (max_len - len(seq)) + seq


def test_loo_by_hand():
    # A: y@1 z@2 w@2 (tie: input order z, w) x@3; B: p q (2 items: all train); C: r s t
    inter = make([("A", "x", 3), ("A", "y", 1), ("B", "p", 5), ("A", "z", 2), ("C", "r", 1), ("A", "w", 2),
                  ("C", "s", 2), ("B", "q", 6), ("C", "t", 3)])
    ds = build_dataset(inter, max_len=3, split="loo")
    assert ds.num_items == 9 and ds.num_users == 3
    assert ds.item_raw_ids == [None, "p", "q", "r", "s", "t", "w", "x", "y", "z"]
    assert ds.item_index("p") == 1 and 0 not in [ds.item_index(r) for r in "pqrstwxyz"]
    assert ds.user_raw_ids == ["A", "B", "C"]
    train = {(tuple(s.tolist()), int(t)) for s, t in (ds.train[i] for i in range(len(ds.train)))}
    assert train == {(tuple(padded(ds, "y", max_len=3)), ds.item_index("z")),
                     (tuple(padded(ds, "p", max_len=3)), ds.item_index("q"))}
    assert ds.valid.user.tolist() == [0, 2] and ds.test.user.tolist() == [0, 2]
    assert ds.valid.target.tolist() == ids(ds, "w", "s")
    assert ds.valid.item_seq.tolist() == [padded(ds, "y", "z", max_len=3), padded(ds, "r", max_len=3)]
    assert ds.test.target.tolist() == ids(ds, "x", "t")
    assert ds.test.item_seq.tolist() == [padded(ds, "y", "z", "w", max_len=3), padded(ds, "r", "s", max_len=3)]
    # truncation to the last max_len items
    ds2 = build_dataset(inter, max_len=2, split="loo")
    assert ds2.test.item_seq[0].tolist() == ids(ds2, "z", "w")
    pop = ds.item_popularity
    assert pop.shape == (10,) and pop[0] == 0 and pop[ds.item_index("y")] == 1 and pop[ds.item_index("x")] == 0
    s = ds.summary()
    assert (s["users"], s["items"], s["interactions"], s["train_samples"]) == (3, 9, 9, 2)
    assert (s["valid_users"], s["test_users"], s["max_length"]) == (2, 2, 4)


def test_time_split_by_hand():
    rows = [("u1", "a", 1), ("u1", "b", 4), ("u1", "c", 5), ("u1", "d", 8),
            ("u2", "a", 2), ("u2", "e", 6), ("u2", "f", 7), ("u2", "g", 9)]
    inter = make(rows)
    ds = build_dataset(inter, max_len=4, split="time", split_time=(5, 7))
    assert len(ds.train) == 1
    assert ds.train[0][0].tolist() == padded(ds, "a", max_len=4) and int(ds.train[0][1]) == ds.item_index("b")
    assert ds.valid.user.tolist() == [0, 1] and ds.valid.target.tolist() == ids(ds, "c", "e")
    assert ds.valid.item_seq.tolist() == [padded(ds, "a", "b", max_len=4), padded(ds, "a", max_len=4)]
    assert ds.test.user.tolist() == [0, 1, 1] and ds.test.target.tolist() == ids(ds, "d", "f", "g")
    assert ds.test.item_seq.tolist() == [padded(ds, "a", "b", "c", max_len=4), padded(ds, "a", "e", max_len=4),
                                         padded(ds, "a", "e", "f", max_len=4)]
    # quantiles: 8 timestamps 1 2 4 5 6 7 8 9 -> quantile(0.5) = 5.5, quantile(0.75) = 7.25
    dq = build_dataset(inter, max_len=4, split="time", split_time=(0.5, 0.75))
    assert dq.valid.target.tolist() == ids(dq, "e", "f") and dq.test.target.tolist() == ids(dq, "d", "g")
    with pytest.raises(ValueError, match="split_time"):
        build_dataset(inter, split="time")
    with pytest.raises(ValueError, match="t_valid <= t_test"):
        build_dataset(inter, split="time", split_time=(7, 5))
    inter.has_timestamps = False
    with pytest.raises(ValueError, match="needs timestamps"):
        build_dataset(inter, split="time", split_time=(5, 7))


def test_prefix_samples_match_python():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        for k in range(int(rng.integers(1, 30))):
            rows.append((u, int(rng.integers(1, 60)), float(rng.integers(0, 10))))
    inter = make(rows)
    max_len = 7
    ds = build_dataset(inter, max_len=max_len)
    # Python construction: per user, stable time order, LOO, every prefix of the train part.
    expected = []
    for u in range(40):
        seq = [ds.item_index(i) for (uu, i, t) in sorted([r for r in rows if r[0] == u], key=lambda r: r[2])]
        train = seq[:-2] if len(seq) >= 3 else seq
        for t in range(1, len(train)):
            h = train[:t][-max_len:]
            expected.append(([0] * (max_len - len(h)) + h, train[t]))
    assert len(ds.train) == len(expected)
    seq, tgt = ds.train.gather(torch.arange(len(ds.train)))
    assert seq.dtype == torch.long and seq.shape == (len(expected), max_len)
    assert [(s, t) for s, t in zip(seq.tolist(), tgt.tolist())] == expected
    perm = torch.randperm(len(ds.train))[:50]
    s2, t2 = ds.train.gather(perm)
    assert torch.equal(s2, seq[perm]) and torch.equal(t2, tgt[perm])
    s3, t3 = ds.train.gather(perm.numpy())
    assert torch.equal(s3, s2)
    assert torch.equal(ds.train[5][0], seq[5]) and torch.equal(ds.train[-1][0], seq[-1])
    with pytest.raises(IndexError):
        ds.train[len(ds.train)]
    assert int(seq.max()) <= ds.num_items and (tgt >= 1).all()


def test_k_core_matches_bruteforce():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 30, 300)
    i = rng.integers(0, 40, 300)
    keep = k_core_filter(u, i, 5)
    alive = np.ones(300, dtype=bool)
    changed = True
    while changed:
        changed = False
        for arr in (u, i):
            cnt = {}
            for x in arr[alive]:
                cnt[x] = cnt.get(x, 0) + 1
            drop = alive & np.array([cnt.get(x, 0) < 5 for x in arr])
            if drop.any():
                alive &= ~drop
                changed = True
    assert np.array_equal(keep, alive)
    inter = make([(int(a), int(b), float(k)) for k, (a, b) in enumerate(zip(u, i))])
    ds = build_dataset(inter, k_core=5)
    assert ds.num_interactions == int(alive.sum())
    assert ds.num_users == len(np.unique(u[alive])) and ds.num_items == len(np.unique(i[alive]))


def test_k_core_cascade_and_rating_filter():
    # k=2: item c occurs once -> dropped -> u3 keeps one interaction -> dropped
    inter = make([("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "b", 2), ("u3", "c", 1), ("u3", "a", 2)],
                 rating=[5, 4, 4, 5, 5, 1])
    ds = build_dataset(inter, k_core=2)
    assert ds.user_raw_ids == ["u1", "u2"] and ds.item_raw_ids == [None, "a", "b"]
    ds = build_dataset(inter, min_rating=3)  # drops (u3, a, 1)
    assert ds.num_interactions == 5 and ds.num_items == 3
    ds = build_dataset(inter, min_rating=4)  # keeps rating > 4 only
    assert ds.num_interactions == 3
    with pytest.raises(ValueError, match="min_rating"):
        build_dataset(make([("u", "a", 1)]), min_rating=3)
    with pytest.raises(ValueError, match="split: expected one of"):
        build_dataset(inter, split="random")


def test_integer_ids_remapped_from_one():
    inter = make([(7, 0, 1), (7, 5, 2), (7, 3, 3), (9, 0, 1)])
    ds = build_dataset(inter)
    assert ds.item_raw_ids == [None, 0, 3, 5]  # raw item 0 becomes internal 1: 0 stays padding
    assert ds.item_index(0) == 1 and ds.item_index("5") == 3
    with pytest.raises(KeyError, match="not in dataset"):
        ds.item_index(4)
    assert ds.item_titles == ["<pad>", "", "", ""]


# ----------------------------------------------------------------------------- amazon2023

HEADER = "user_id,parent_asin,rating,timestamp,history\n"


def write_amazon(folder: Path, category: str, train, valid, test):
    folder.mkdir(parents=True, exist_ok=True)
    for kind, rows in (("train", train), ("valid", valid), ("test", test)):
        text = HEADER + "".join(",".join(map(str, r)) + "\n" for r in rows)
        (folder / f"{category}.{kind}.csv").write_text(text)
    return folder


H5 = "I1 I2 I3 I4 I5"


@pytest.fixture
def amazon(tmp_path):
    return write_amazon(tmp_path / "am", "Video_Games",
                        train=[("U1", "I6", 5.0, 100, H5),                         # kept
                               ("U1", "I7", 2.0, 110, H5 + " I6"),                 # rating <= 3
                               ("U2", "I8", 4.0, 105, "I1 I2 I3 I4"),              # history of 4
                               ("U2", "I9", 4.0, 120, "I1 I2 I3 I4 I8")],          # kept
                        valid=[("U1", "I9", 5.0, 200, H5 + " I6 I7"),              # kept
                               ("U2", "I7", 5.0, 210, "I1 I2 I3 I4 I8 I9"),        # I7 not in training
                               ("U2", "I8", 4.0, 220, "I1 I2 I3 I4 I8 I9")],       # I8 in a train history
                        test=[("U1", "I6", 4.0, 300, H5 + " I6 I7 I9"),            # kept
                              ("U2", "I10", 5.0, 310, "I1 I2 I3 I4 I8 I9 I8"),     # unknown item
                              ("U1", "I9", 3.0, 320, H5 + " I6 I7 I9 I6")])        # rating 3


def test_amazon2023_filters(amazon):
    assert detect_format(amazon) == "amazon2023"
    assert detect_format(amazon / "Video_Games") == "amazon2023"
    assert detect_format(amazon / "Video_Games.valid.csv") == "amazon2023"
    inter = read_interactions(amazon)
    assert inter.fmt == "amazon2023" and inter.name == "Video_Games"
    assert inter.predefined_split.tolist() == ["train", "train", "valid", "valid", "test"]
    assert inter.item.tolist() == ["I6", "I9", "I9", "I8", "I6"]
    assert inter.user.tolist() == ["U1", "U2", "U1", "U2", "U1"]
    assert inter.timestamp.tolist() == [100, 120, 200, 220, 300]
    same = read_interactions(amazon / "Video_Games", fmt="amazon2023")
    assert same.item.tolist() == inter.item.tolist()
    loose = read_interactions(amazon, min_rating=None, min_history=0, require_train_items=False)
    assert len(loose) == 10


def test_amazon2023_dataset(amazon):
    ds = build_dataset(read_interactions(amazon), max_len=6)
    assert ds.split == "predefined"
    assert ds.item_raw_ids == [None] + sorted(f"I{k}" for k in range(1, 10))  # I10 was filtered out
    seq, tgt = ds.train.gather(torch.arange(len(ds.train)))
    assert tgt.tolist() == ids(ds, "I6", "I9")
    assert seq.tolist() == [padded(ds, *H5.split(), max_len=6), padded(ds, "I1", "I2", "I3", "I4", "I8", max_len=6)]
    assert ds.valid.target.tolist() == ids(ds, "I9", "I8") and ds.valid.user.tolist() == [0, 1]
    assert ds.valid.item_seq[0].tolist() == ids(ds, "I2", "I3", "I4", "I5", "I6", "I7")  # last 6 of 7
    assert ds.test.target.tolist() == ids(ds, "I6")
    assert build_dataset(read_interactions(amazon), split="time").split == "predefined"
    with pytest.raises(ValueError, match="got 'loo'"):
        build_dataset(read_interactions(amazon), split="loo")
    with pytest.raises(ValueError, match="k_core"):
        build_dataset(read_interactions(amazon), k_core=2)


def test_amazon2023_cds_needs_ten(tmp_path):
    h9 = " ".join(f"C{k}" for k in range(9))
    d = write_amazon(tmp_path / "cd", "CDs_and_Vinyl",
                     train=[("U1", "X", 5, 1, h9), ("U1", "Y", 5, 2, h9 + " X")], valid=[], test=[])
    inter = read_interactions(d)
    assert inter.item.tolist() == ["Y"]


def test_amazon2023_malformed(tmp_path, amazon):
    p = amazon / "Video_Games.test.csv"
    p.write_text(HEADER + "U1,I6,4.0,300,I1 I2\nU1,I6,4.0\n")
    with pytest.raises(DataFormatError, match=r"Video_Games\.test\.csv, line 3: expected 5 comma-separated"):
        read_interactions(amazon)
    p.write_text(HEADER + "U1,I6,four,300,I1 I2\n")
    with pytest.raises(DataFormatError, match=r"line 2: expected a number in column 'rating'"):
        read_interactions(amazon)
    p.write_text("user_id,item,rating\n")
    with pytest.raises(DataFormatError, match=r"line 1: expected the columns"):
        read_interactions(amazon)
    (amazon / "Video_Games.test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="test file"):
        read_interactions(amazon, fmt="amazon2023")


def test_batches_cover_every_sample_once():
    inter = make([(u, (u * 7 + k) % 23, float(k)) for u in range(10) for k in range(6)])
    ds = build_dataset(inter, max_len=4)
    seqs, tgts = zip(*ds.train.batches(7, generator=torch.Generator().manual_seed(0)))
    seq, tgt = torch.cat(seqs), torch.cat(tgts)
    assert len(tgt) == len(ds.train) == 30 and seq.shape == (30, 4)
    ref_seq, ref_tgt = ds.train.gather(torch.arange(30))
    as_set = lambda s, t: sorted(map(tuple, torch.cat([s, t[:, None]], 1).tolist()))  # noqa: E731
    assert as_set(seq, tgt) == as_set(ref_seq, ref_tgt)
    assert sum(len(t) for _, t in ds.train.batches(7, drop_last=True)) == 28
    assert torch.equal(torch.cat([b[0] for b in ds.valid.batches(3)]), ds.valid.item_seq)
    assert ds.train.lengths().max() <= 4


def test_amazon2023_headerless_release(tmp_path):
    d = write_amazon(tmp_path / "nh", "Video_Games", train=[("U1", "I6", 5.0, 100, H5)], valid=[],
                     test=[("U1", "I6", 5.0, 300, H5 + " I6"), ("U1", "I1", "x", 301, H5)])
    for kind in ("train", "valid", "test"):
        p = d / f"Video_Games.{kind}.csv"
        p.write_text(p.read_text().replace(HEADER, ""))
    with pytest.raises(DataFormatError, match=r"test\.csv, line 2: expected a number in column 'rating'"):
        read_interactions(d)
    (d / "Video_Games.test.csv").write_text(f"U1,I6,5.0,300,{H5} I6\n")
    assert read_interactions(d).predefined_split.tolist() == ["train", "test"]


def test_empty_data_is_an_error():
    empty = Interactions(user=np.array([], dtype=np.int64), item=np.array([], dtype=np.int64),
                         timestamp=np.array([]), name="meta")
    with pytest.raises(ValueError, match="expected interactions, got none"):
        build_dataset(empty)
    with pytest.raises(ValueError, match="rating > 9"):
        build_dataset(make([("u", "a", 1)], rating=[5]), min_rating=9)
