"""Readers of plr.data on small files written here, and every folder of the
shared real datasets (../shared/data) with the counts of its README."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from plr.data import (DataFormatError, build_dataset, dataset_stats, detect_format, format_stats,
                      read_interactions)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, text: str, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- table

@pytest.mark.parametrize("sep", [",", "\t"])
@pytest.mark.parametrize("gz", [False, True])
def test_table_detects_columns(tmp_path, sep, gz):
    rows = [("userId", "movieId", "rating", "timestamp"), ("u1", "10", "4.5", "100"), ("u1", "11", "3", "90"),
            ("u2", "10", "5", "80")]
    text = "\n".join(sep.join(r) for r in rows) + "\n"
    p = write(tmp_path / ("r.csv.gz" if gz else "r.csv"), text, gz)
    inter = read_interactions(p)
    assert inter.fmt == "table"
    assert inter.user.tolist() == ["u1", "u1", "u2"]
    assert inter.item.tolist() == [10, 11, 10] and inter.item.dtype == np.int64
    assert inter.rating.tolist() == [4.5, 3.0, 5.0]
    assert inter.timestamp.tolist() == [100.0, 90.0, 80.0]
    assert inter.has_timestamps


def test_table_amazon_names_quotes_and_no_timestamp(tmp_path):
    p = write(tmp_path / "a.csv", 'reviewerID,asin,overall,summary\nA,"0007",5,"great, really"\nB,X1,2,ok\n')
    inter = read_interactions(p)
    assert inter.user.tolist() == ["A", "B"]
    assert inter.item.tolist() == ["0007", "X1"]  # leading zero: stays a string id
    assert inter.rating.tolist() == [5.0, 2.0]
    assert inter.timestamp.tolist() == [0.0, 1.0] and not inter.has_timestamps


def test_table_explicit_columns_and_whitespace(tmp_path):
    p = write(tmp_path / "w.txt", "who what when\n1 5 3\n1 6 2\n\n2 5 1\n")
    inter = read_interactions(p, fmt="table", columns={"user": "who", "item": "what", "timestamp": "when"})
    assert inter.user.tolist() == [1, 1, 2] and inter.item.tolist() == [5, 6, 5]
    assert inter.timestamp.tolist() == [3.0, 2.0, 1.0] and inter.rating is None
    with pytest.raises(DataFormatError, match="expected a user column"):
        read_interactions(p, fmt="table")
    with pytest.raises(ValueError, match="columns"):
        read_interactions(p, fmt="table", columns={"usr": "who"})


@pytest.mark.parametrize("sep", [",", "\t"])
def test_table_malformed_lines(tmp_path, sep):
    p = write(tmp_path / "bad.csv", sep.join(["user_id", "item_id", "timestamp"]) + "\n"
              + sep.join(["1", "2", "3"]) + "\n" + sep.join(["1", "2"]) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv, line 3: expected 3 fields"):
        read_interactions(p)
    p = write(tmp_path / "bad2.csv", sep.join(["user_id", "item_id", "timestamp"]) + "\n"
              + sep.join(["1", "2", "3"]) + "\n\n" + sep.join(["1", "2", "soon"]) + "\n")
    msg = r"bad2\.csv, line 4: expected a number or an ISO 8601 date in column 'timestamp', got 'soon'"
    with pytest.raises(DataFormatError, match=msg) as e:
        read_interactions(p)
    assert e.value.line == 4 and isinstance(e.value, ValueError)


def test_table_quoted_newline_line_number(tmp_path):
    p = write(tmp_path / "q.csv", 'user,item,timestamp,text\n1,2,3,"a\nb"\n1,2,x,c\n')
    with pytest.raises(DataFormatError, match=r"line 4"):
        read_interactions(p)


# ----------------------------------------------------------------------------- sasrec / sequences

def test_sasrec_lines(tmp_path):
    p = write(tmp_path / "s.txt", "1 5\n1 3\n2 5\n1 7\n")
    assert detect_format(p) == "sasrec"
    inter = read_interactions(p)
    assert inter.fmt == "sasrec" and not inter.has_timestamps
    assert inter.user.tolist() == [1, 1, 2, 1] and inter.item.tolist() == [5, 3, 5, 7]
    assert inter.timestamp.tolist() == [0, 1, 2, 3]
    p2 = write(tmp_path / "s2.txt", "1\t5\n\n1\t3\n")  # tabs and a blank line: slow path
    inter = read_interactions(p2, fmt="sasrec")
    assert inter.item.tolist() == [5, 3] and inter.timestamp.tolist() == [0, 2]


def test_sasrec_malformed(tmp_path):
    p = write(tmp_path / "s.txt", "1 5\n1 3\n2 5 9\n")
    with pytest.raises(DataFormatError, match=r"s\.txt, line 3: expected 2 fields 'user item', got 3"):
        read_interactions(p, fmt="sasrec")


def test_sequences_lines(tmp_path):
    p = write(tmp_path / "seq.txt", "1 4 5 6\n2 5 7\n3 9 9 9 1\n")
    assert detect_format(p) == "sequences"
    inter = read_interactions(p)
    assert inter.user.tolist() == [1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert inter.item.tolist() == [4, 5, 6, 5, 7, 9, 9, 9, 1]
    assert np.all(np.diff(inter.timestamp) > 0)
    bad = write(tmp_path / "bad.txt", "1 4 5\n\n2\n")
    with pytest.raises(DataFormatError, match=r"bad\.txt, line 3: expected 'user item1 item2 \.\.\.'"):
        read_interactions(bad, fmt="sequences")


# ----------------------------------------------------------------------------- recbole / seqrecbench / movielens

def test_recbole_with_titles(tmp_path):
    write(tmp_path / "toy" / "toy.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
          "1\t10\t4\t50\n1\t11\t2\t40\n2\t10\t5\t60\n")
    write(tmp_path / "toy" / "toy.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\n"
          "10\tToy Story\t1995\n11\tHeat\t1995\n")
    assert detect_format(tmp_path / "toy") == "recbole"
    inter = read_interactions(tmp_path / "toy")
    assert inter.fmt == "recbole" and inter.name == "toy"
    assert inter.rating.tolist() == [4, 2, 5] and inter.timestamp.tolist() == [50, 40, 60]
    assert inter.item_titles == {10: "Toy Story", 11: "Heat"}
    write(tmp_path / "bad" / "b.inter", "user_id:token\titem_id:token\n1\t2\n3\n")
    with pytest.raises(DataFormatError, match=r"b\.inter, line 3"):
        read_interactions(tmp_path / "bad")


def test_seqrecbench_folder(tmp_path):
    d = tmp_path / "bench"
    write(d / "interactions.tsv.gz", "user_id\titem_id\ttimestamp\n100\t101\t5\n100\t102\t5\n101\t101\t7\n", gz=True)
    write(d / "items.tsv", 'item_id\ttitle\n101\t"Quoted" title, with comma\n102\tPlain\n')
    assert detect_format(d) == "seqrecbench"
    inter = read_interactions(d)
    assert inter.name == "bench" and len(inter) == 3
    assert inter.item_titles[101] == '"Quoted" title, with comma'  # quoting disabled
    ds = build_dataset(inter, max_len=4)
    assert ds.item_titles == ["<pad>", '"Quoted" title, with comma', "Plain"]


def test_movielens_dat(tmp_path):
    d = tmp_path / "ml"
    write(d / "ratings.dat", "1::10::5::978300760\n1::20::3::978300761\n2::10::4::978300000\n")
    (d / "movies.dat").write_bytes("10::Amélie (2001)::Comedy\n20::Heat (1995)::Action\n".encode("iso-8859-1"))
    write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    inter = read_interactions(d)
    assert inter.fmt == "movielens" and inter.rating.tolist() == [5, 3, 4]
    assert inter.item_titles[10] == "Amélie (2001)" and len(inter.user_catalog) == 2
    write(d / "ratings.dat", "1::10::5\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat, line 1: expected 'user::item::rating::timestamp'"):
        read_interactions(d)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="fmt: expected one of"):
        read_interactions(tmp_path, fmt="parquet")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_interactions(tmp_path / "missing.csv")
    write(tmp_path / "a.txt", "1 2\n")
    write(tmp_path / "b.txt", "1 2\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_interactions(tmp_path)


def test_stats_and_format(tmp_path):
    p = write(tmp_path / "seq.txt", "1 4 5 6\n2 5 7\n3 9 8 7 1\n")
    st = dataset_stats(p)
    assert (st["users"], st["items"], st["interactions"]) == (3, 7, 9)
    assert st["sequence_length"]["min"] == 2 and st["sequence_length"]["max"] == 4
    assert st["sequence_length"]["median"] == 3 and abs(st["sparsity"] - (1 - 9 / 21)) < 1e-12
    text = format_stats(st)
    assert "users" in text and "median 3" in text
    assert "duplicates   none: no item recurs" in text  # the hint that excluding the history is safe
    repeated = dataset_stats(write(tmp_path / "rep.txt", "1 4 5 4\n2 5 7\n"))
    assert repeated["duplicates"] == 1 and "no item recurs" not in format_stats(repeated)
    assert dataset_stats(read_interactions(p))["interactions"] == 9


# ----------------------------------------------------------------------------- real data

# folder: (format, users, items, interactions), from ../shared/data/README.md
REAL = {
    "amazon2018-videogames_seqrecbench": ("seqrecbench", 50597, 16874, 453637),
    "amazon2014-beauty_seqrecbench": ("seqrecbench", 22332, 12086, 198215),
    "ml-1m_seqrecbench": ("seqrecbench", 6040, 3416, 999611),
    "steam-100k_seqrecbench": ("seqrecbench", 10369, 3593, 126824),
    "amazon2014-games_sasrec": ("sasrec", 31013, 23715, 287107),
    "s3rec-beauty": ("sequences", 22363, 12101, 198502),
    "ml-100k_recbole": ("recbole", 943, 1682, 100000),
    "ml-1m_raw_meta": ("movielens", 6040, 3883, 0),
}


@pytest.fixture(scope="module")
def real_cache():
    return {}


def load_real(cache, folder):
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    if folder not in cache:
        cache[folder] = read_interactions(path)
    return cache[folder]


@pytest.mark.parametrize("folder", sorted(REAL))
def test_real_folder_counts(real_cache, folder):
    fmt, users, items, rows = REAL[folder]
    inter = load_real(real_cache, folder)
    assert inter.fmt == fmt
    assert len(inter) == rows
    if rows:
        assert (inter.num_users, inter.num_items) == (users, items)
        st = dataset_stats(inter)
        assert (st["users"], st["items"], st["interactions"]) == (users, items, rows)
    else:  # metadata only: the catalogs give the counts
        assert (len(inter.user_catalog), len(inter.item_catalog)) == (users, items)
        assert len(inter.item_titles) == items
    if fmt in ("seqrecbench", "recbole"):
        assert len(inter.item_titles) == items


@pytest.mark.parametrize("folder", ["amazon2018-videogames_seqrecbench", "s3rec-beauty", "ml-100k_recbole"])
def test_real_folder_builds(real_cache, folder):
    inter = load_real(real_cache, folder)
    ds = build_dataset(inter, max_len=50)
    s = ds.summary()
    assert s["users"] == inter.num_users and s["items"] == inter.num_items
    assert s["valid_users"] <= s["users"] and s["test_samples"] == s["valid_samples"]
    assert s["train_samples"] == s["interactions"] - 2 * s["valid_samples"] - s["users"]
    seq, tgt = ds.train.gather(np.arange(0, len(ds.train), 97))
    assert seq.shape[1] == 50 and int(tgt.min()) >= 1 and int(tgt.max()) <= ds.num_items
    assert int(ds.test.item_seq.max()) <= ds.num_items
    assert len(ds.item_titles) == ds.num_items + 1


def test_table_iso_dates_and_split_named_csv(tmp_path):
    p = write(tmp_path / "ratings.train.csv", "user,item,time\n1,2,2020-01-02\n1,3,2020-01-01T00:00:10\n")
    assert detect_format(p) == "table"  # a *.train.csv that is not the Amazon 2023 benchmark
    inter = read_interactions(p)
    assert inter.timestamp.tolist() == [1577923200.0, 1577836810.0]
    bad = write(tmp_path / "bad.csv", "user,item,time\n1,2,2020-01-02\n1,3,yesterday\n")
    with pytest.raises(DataFormatError, match=r"line 3: expected a number or an ISO 8601 date in column 'time'"):
        read_interactions(bad)


def test_seqrecbench_bad_items_file(tmp_path):
    d = tmp_path / "bench"
    write(d / "interactions.tsv", "user_id\titem_id\ttimestamp\n100\t101\t5\n")
    write(d / "items.tsv", "item_id\ttitle\n101\tok\n102 no tab here\n")
    with pytest.raises(DataFormatError, match=r"items\.tsv, line 3: expected an item id and a title separated by"):
        read_interactions(d)
