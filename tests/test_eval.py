"""lora-ds eval on 2 ranks under ZeRO-3 of an adapter with modules_to_save and a grown vocabulary (--add_tokens)
against one process on the merged model, lora-ds score on what eval
wrote, and the generation eval during training (real `deepspeed` launches on CPU, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import save_model_dir, write_mnli
from helpers import as_tensorboard, flags, launch, read_metrics, tensorboard_scalars, train_args

from lora_ds.cli import main as cli


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def eval_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def saved_adapter(base_dir, random_adapter, tmp_path_factory) -> Path:
    """The random adapter plus what an --add_tokens run trains in full (modules_to_save): its tokenizer with 2
    tokens more, the input embedding and head grown to 514 rows and moved off the base's (EOS's head row kept
    1.05 x EOS_LIKE's, so that generations still end at different lengths)."""
    from conftest import EOS_LIKE
    from transformers import AutoModelForCausalLM

    from lora_ds.adapter import read_adapter, write_adapter
    from lora_ds.vocab import extend_tokenizer, grow_vocab

    root = tmp_path_factory.mktemp("saved_adapter")
    (root / "tokens.txt").write_text("SELECT\nWHERE\n")
    tok, files, first = extend_tokenizer(str(base_dir), str(root / "tokens.txt"))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    grow_vocab(model, tok.vocab_size, first)
    gen = torch.Generator().manual_seed(5)
    embed, head = (m.weight.detach().clone() for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    embed += 0.005 * torch.randn(embed.shape, generator=gen)
    head += 0.005 * torch.randn(head.shape, generator=gen)
    head[0] = head[EOS_LIKE] * 1.05
    config, tensors = read_adapter(str(random_adapter))
    tensors |= {"gpt_neox.embed_in.weight": embed, "lm_head.weight": head}
    write_adapter(
        str(root / "adapter"), tensors, config | {"modules_to_save": ["lm_head", "embed_in"]}, extra_json=files
    )
    return root / "adapter"


@pytest.fixture(scope="module")
def merged_dir(base_dir, saved_adapter, tmp_path_factory) -> Path:
    """base + the saved-modules adapter merged (W0 + s·B·A, the grown embedding and head) and saved as a plain
    Hugging Face model dir with the adapter's tokenizer."""
    from lora_ds.eval_model import build_eval_model, read_lora
    from lora_ds.tokenizer import load_tokenizer

    lora = read_lora(str(saved_adapter), None)
    model, _, _ = build_eval_model(str(base_dir), load_tokenizer(str(saved_adapter)), lora, "fp32", None)
    assert model.get_input_embeddings().weight.shape == (514, 64)
    return save_model_dir(model, tmp_path_factory.mktemp("merged"), tokenizer=saved_adapter)


MAX_NEW = 28


@pytest.fixture(scope="module")
def wikisql_runs(base_dir, saved_adapter, merged_dir, wikisql_file, tmp_path_factory):
    """(2-rank ZeRO-3 eval of base + adapter (grown vocabulary, modules_to_save) into zero3/, merged/ for the
    1-process eval, their flags)."""
    root = tmp_path_factory.mktemp("wikisql_runs")
    common = [
        "--task",
        "wikisql",
        "--data",
        str(wikisql_file),
        "--dtype",
        "fp32",
        "--batch-size",
        "2",
        "--max-new-tokens",
        str(MAX_NEW),
    ]
    launch(
        ["eval", "--model", base_dir, "--adapter", saved_adapter, "--out", root / "zero3", "--no-progress", *common],
        program="lora_ds",
        timeout=600,
    )
    return root / "zero3", root / "merged", common


def generated_lengths(model_dir: Path, wikisql_file: Path) -> list[int]:
    """Tokens each WikiSQL prompt generates greedily before EOS (capped at MAX_NEW), one prompt at a time."""
    from transformers import AutoModelForCausalLM

    from lora_ds.evaluation import load_eval_set
    from lora_ds.generate import prompt_ids
    from lora_ds.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lengths = []
    for example in load_eval_set("wikisql", [str(wikisql_file)]).examples:
        ids = torch.tensor([prompt_ids(tok, example.prompt, 1024)])
        out = model.generate(
            input_ids=ids,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        lengths.append(out.shape[1] - ids.shape[1])
    return lengths


@pytest.mark.distributed
def test_greedy_under_two_rank_zero3_equals_one_process_on_the_merged_model(
    wikisql_runs, merged_dir, wikisql_file, capsys
):
    # Batches of 2 on 2 ranks: rank 0 runs examples [1, 2] and [5], rank 1 [3, 4] and a dummy; some
    # generations end at EOS while the others run to the limit, so ranks finish at different steps.
    lengths = generated_lengths(merged_dir, wikisql_file)
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW, lengths
    zero3, merged, common = wikisql_runs
    capsys.readouterr()
    assert cli(["eval", "--model", str(merged_dir), "--out", str(merged), *common]) == 0
    out, err = capsys.readouterr()
    a, b = read_rows(zero3), read_rows(merged)
    assert [r["id"] for r in a] == [f"dev.jsonl:{i}" for i in range(1, 6)] == [r["id"] for r in b]
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    ma, mb = eval_metrics(zero3), eval_metrics(merged)
    assert ma["metrics"] == mb["metrics"] and ma["metrics"]["dev"]["n"] == 5
    assert (ma["world_size"], ma["zero3"], mb["world_size"], mb["zero3"]) == (2, True, 1, False)
    assert ma["decoding"] == {"strategy": "greedy", "num_beams": 1, "max_new_tokens": MAX_NEW, "max_len": 1024}
    assert set(a[0]) == {"id", "split", "prompt", "prediction", "reference", "score"}
    assert a[0]["reference"] == 'SELECT "Position" FROM table WHERE "Player" = \'Alan Smith\''
    assert len((zero3 / "predictions.official.jsonl").read_text().splitlines()) == 5
    assert "split  n  lf_accuracy  ex_accuracy  unparsed  gold_exec_errors" in out
    assert "wikisql generate" in err  # the progress bar


@pytest.mark.distributed
def test_score_of_eval_predictions_reproduces_eval_metrics(wikisql_runs, wikisql_file, tmp_path, capsys):
    zero3, _, _ = wikisql_runs
    assert (
        cli(
            [
                "score",
                *flags(
                    task="wikisql",
                    data=str(wikisql_file),
                    predictions=str(zero3 / "predictions.jsonl"),
                    out=str(tmp_path / "by_id"),
                ),
            ]
        )
        == 0
    )
    assert eval_metrics(tmp_path / "by_id")["metrics"] == eval_metrics(zero3)["metrics"]
    assert (
        cli(
            [
                "score",
                *flags(
                    task="wikisql",
                    data=str(wikisql_file),
                    predictions=str(zero3 / "predictions.official.jsonl"),
                    out=str(tmp_path / "official"),
                ),
            ]
        )
        == 0
    )
    assert eval_metrics(tmp_path / "official")["metrics"] == eval_metrics(zero3)["metrics"]
    assert "lf_accuracy" in capsys.readouterr().out


@pytest.fixture(scope="module")
def run_dir(base_dir, wikisql_file, tmp_path_factory) -> Path:
    """A 2-rank ZeRO-3 training run on the WikiSQL fixture (prepared by data_prep) with --eval_task at steps
    1 and 2; its checkpoint and adapter are evaluated below."""
    from data_prep.common import Settings, prepare

    root = tmp_path_factory.mktemp("train")
    prepare(Settings(task="wikisql", src=[str(wikisql_file)], tokenizer=str(base_dir), out=str(root / "prepared")))
    launch(
        train_args(
            base_dir,
            root / "run",
            data=root / "prepared",
            eval_task=f"wikisql:{wikisql_file}",
            eval_task_samples=3,
            eval_every=1,
            max_steps=2,
            micro_batch=1,
            lr=1e-2,
            report_to="tensorboard",
        )
    )
    return root / "run"


@pytest.mark.distributed
def test_generation_eval_during_training_is_logged_at_eval_steps_to_metrics_and_tensorboard(run_dir):
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "eval_wikisql_lf_accuracy" in r] == [1, 2]
    for r in records:
        assert r["eval_wikisql_n"] == 3 and 0 <= r["eval_wikisql_unparsed"] <= 3
        assert r["eval_wikisql_lf_accuracy"] in (0.0, 100 / 3, 200 / 3, 100.0)
    scalars = tensorboard_scalars(run_dir)  # --report_to tensorboard: the task's metrics too, at their steps
    assert scalars == as_tensorboard(records) and [s for s, _ in scalars["eval/wikisql_lf_accuracy"]] == [1, 2]
    sample = read_rows(run_dir / "eval" / "step_00000002")
    assert len(sample) == 3 and eval_metrics(run_dir / "eval" / "step_00000002")["step"] == 2
    assert {r["id"] for r in sample} == {r["id"] for r in read_rows(run_dir / "eval" / "step_00000001")}


@pytest.mark.distributed
def test_beam_search_and_label_choice_from_a_checkpoint_match_its_adapter_in_one_process(base_dir, run_dir, tmp_path):
    """MNLI, 7 examples in batches of 3 on 2 ranks (rank 1 runs a dummy batch to keep step), LoRA read from
    the training checkpoint by DeepSpeed; against the run's adapter merged in one process."""
    data = [str(p) for p in write_mnli(tmp_path / "mnli")]
    common = [
        "--model",
        str(base_dir),
        "--task",
        "mnli",
        "--data",
        *data,
        "--dtype",
        "fp32",
        "--batch-size",
        "3",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "6",
        "--no-progress",
    ]
    launch(
        ["eval", *common, "--checkpoint", run_dir / "checkpoints", "--out", tmp_path / "zero3"],
        program="lora_ds",
        timeout=600,
    )
    assert cli(["eval", *common, "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "one")]) == 0
    a, b = read_rows(tmp_path / "zero3"), read_rows(tmp_path / "one")
    assert [(r["split"], r["id"]) for r in a] == [
        ("matched", "m1"),
        ("matched", "m2"),
        ("matched", "m3"),
        ("matched", "m4"),
        ("mismatched", "x1"),
        ("mismatched", "x2"),
        ("mismatched", "x3"),
    ]
    assert [(r["prediction"], r["constrained"]) for r in a] == [(r["prediction"], r["constrained"]) for r in b]
    assert all(r["constrained"] in ("entailment", "neutral", "contradiction") for r in a)
    metrics = eval_metrics(tmp_path / "zero3")
    assert metrics["metrics"] == eval_metrics(tmp_path / "one")["metrics"]
    assert metrics["lora"].endswith("checkpoints/step_00000002")
    assert metrics["decoding"]["strategy"] == "beam" and set(metrics["metrics"]) == {"matched", "mismatched"}
    expected = 100 * sum(r["constrained"] == r["reference"] for r in a[:4]) / 4
    assert metrics["metrics"]["matched"]["accuracy_constrained"] == expected


def test_flag_and_data_errors_name_what_to_fix(wikisql_file, tmp_path, capsys):
    base = ["eval", "--model", "preset:tiny-gpt-neox", "--task", "wikisql", "--out", str(tmp_path)]
    assert cli([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli([*base, "--data", str(wikisql_file), "--max-new-tokens", "2000"]) == 2
    assert "--max_new_tokens 2000 leaves no room for the prompt in --max_len 1024" in capsys.readouterr().err
    assert cli([*base, "--data", str(wikisql_file), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "none: no such directory; give OUTPUT/checkpoints of a run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli([*base, "--data", str(wikisql_file), "--adapter", "a", "--checkpoint", "b"])
