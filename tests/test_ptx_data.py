"""PTX data: a JSONL file or a local `datasets` directory; bad input names the file and line."""

from __future__ import annotations

import pytest

from hybrid_ppo.ptx import PTXBatches, read_pretrain_texts
from hybrid_ppo.tasks.tokenizer import build_tokenizer


def test_jsonl_and_datasets_directory_give_the_same_texts(tmp_path):
    from datasets import Dataset

    texts = ["max 1 2 = 2", "3 4 5"]
    (tmp_path / "p.jsonl").write_text('{"text": "max 1 2 = 2"}\n\n{"text": "3 4 5"}\n')
    Dataset.from_dict({"text": texts, "source": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_pretrain_texts(str(tmp_path / "p.jsonl")) == texts
    assert read_pretrain_texts(str(tmp_path / "ds")) == texts


@pytest.mark.parametrize("content, message", [
    ('{"text": "1 2"}\n{"txt": "3"}\n', r"p.jsonl:2: expected an object with a 'text' string"),
    ('{"text": "1 2"}\nnot json\n', r"p.jsonl:2: not valid JSON"),
    ("\n", "no texts"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_pretrain_texts(str(tmp_path / "p.jsonl"))


def test_missing_path_and_missing_column(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="neither a JSONL file nor a datasets directory"):
        read_pretrain_texts(str(tmp_path / "nope"))
    Dataset.from_dict({"body": ["1"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="no 'text' column"):
        read_pretrain_texts(str(tmp_path / "ds"))


def test_batches_are_right_padded_cut_and_cycle():
    batches = PTXBatches(["1 2 3 4 5 6 7", "8", "9 9"], build_tokenizer(), batch_size=2, max_tokens=4, seed=0)
    seen = []
    for _ in range(3):  # 6 rows: every text twice, across passes
        ids, mask = next(batches)
        assert ids.shape[0] == 2 and ids.shape[1] <= 4
        assert (mask[:, 0] == 1).all()  # right padding: every row starts with a real token
        seen += [int(m.sum()) for m in mask]
    assert sorted(seen) == [2, 2, 3, 3, 4, 4]  # <bos> + tokens, the long text cut at 4
