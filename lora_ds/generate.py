"""Generation (greedy, beam or seeded sampling) and completion scoring: one process, or N ranks under ZeRO-3.

Examples are cut into batches in input order and batch b runs on rank b mod N. A batch thus holds the same
examples, padded the same way, whatever the number of ranks, so the predictions of a run on N ranks equal
those of one process token for token (same weights, same arithmetic). Under ZeRO-3 every forward pass
gathers each layer's weights collectively, so all ranks must run the same number of them: a rank short of
batches runs its first batch again as a dummy (its result dropped), and within a batch `synced_gpus` keeps
a rank that has finished stepping until every rank has. The results of all ranks are gathered on all ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_ds.data import IGNORE_INDEX, collate, encode_pair
from lora_ds.errors import UserError
from lora_ds.fsutil import read_json


def rank_batches(num_examples: int, batch_size: int, rank: int, world: int) -> list[list[int] | None]:
    """This rank's batches (example indices); None marks a dummy that only keeps the ranks in lockstep."""
    batches = [list(range(i, min(i + batch_size, num_examples))) for i in range(0, num_examples, batch_size)]
    per_rank = -(-len(batches) // world)
    mine = batches[rank::world]
    return mine + [None] * (per_rank - len(mine))


def prompt_ids(tok, prompt: str, max_len: int) -> list[int]:
    """[BOS] prompt, as `encode_pair` writes a training context, cut from the left as training contexts are."""
    return tok.with_bos(tok.encode(prompt), max_len)


def stop_ids(tok, model_dir: str | None = None) -> list[int]:
    """The ids a completion ends at: the tokenizer's EOS, and the eos ids of the model dir's generation_config.json
    when the file was written for the model (a chat model's end of turn, Llama 3's <|eot_id|>), not derived by
    transformers from config.json's defaults."""
    ids = [tok.eos_token_id]
    path = os.path.join(model_dir, "generation_config.json") if model_dir else ""
    if os.path.isfile(path):
        config = read_json(path)
        if not config.get("_from_model_config"):
            extra = config.get("eos_token_id")
            ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(ids))


def _gather(local: dict, world: int) -> dict:
    """{example index: result} of every rank, on every rank."""
    if world == 1:
        return local
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def _left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def _progress(total: int, desc: str, rank: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not show or rank != 0, dynamic_ncols=True)


@dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy search. Batch b draws from torch's generator seeded with seed + b, so it draws
    the same tokens whichever rank runs it, and a run on N ranks samples what one process samples."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0


def _generation_config(tok, stop_ids: list[int], max_new_tokens: int, num_beams: int, sampling: Sampling | None):
    from transformers import GenerationConfig

    # Sampling sets every value it uses: transformers fills unset ones from the model's generation_config.json
    # and then its own defaults (top_k=50).
    decoding = dict(do_sample=False)
    if sampling is not None:
        decoding = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        eos_token_id=stop_ids,
        pad_token_id=tok.pad_token_id,
        use_cache=True,
        **decoding,
    )


@torch.no_grad()
def generate_ids(
    model,
    tok,
    encoded: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
    num_beams: int = 1,
    sampling: Sampling | None = None,
    batch_size: int = 8,
    device=None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    desc: str = "generate",
    streamer=None,
) -> list[list[int]]:
    """The completion ids of each encoded prompt: the ids after the prompt, up to the first of `stop_ids` (default:
    the tokenizer's EOS), greedy, beam search or `sampling`.

    `model` is a Hugging Face causal LM (under ZeRO-3: the engine's module). Collective when world > 1.
    `streamer` (a transformers streamer) sees the tokens as they come, in one process with batch_size 1.
    """
    stop_ids = stop_ids or [tok.eos_token_id]
    config = _generation_config(tok, stop_ids, max_new_tokens, num_beams, sampling)
    results = {}
    bar = _progress(len(encoded), desc, rank, progress)
    for batch in rank_batches(len(encoded), batch_size, rank, world):
        ids, mask = _left_padded([encoded[i] for i in (batch or [0])], tok.pad_token_id)
        if sampling is not None:
            torch.manual_seed(sampling.seed + (batch[0] // batch_size if batch else 0))
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            synced_gpus=world > 1,
            streamer=streamer,
        )
        if batch is None:
            continue
        for i, row in zip(batch, out[:, ids.shape[1] :].tolist()):
            ends = [row.index(s) for s in stop_ids if s in row]
            results[i] = row[: min(ends)] if ends else row
        bar.update(min(len(batch) * world, bar.total - bar.n))  # rank 0 shows all ranks' progress
    bar.close()
    results = _gather(results, world)
    return [results[i] for i in range(len(encoded))]


def generate(model, tok, prompts: list[str], *, max_prompt_len: int = 1024, **kwargs) -> list[str]:
    """The completion of each prompt (text after the prompt, up to EOS), encoded as training encodes a prompt;
    `kwargs` as `generate_ids` takes them. Collective when world > 1."""
    encoded = [prompt_ids(tok, p, max_prompt_len) for p in prompts]
    return [tok.decode(ids) for ids in generate_ids(model, tok, encoded, **kwargs)]


@torch.no_grad()
def completion_logprobs(
    model,
    tok,
    prompts: list[str],
    completions: list[str],
    *,
    batch_size: int = 8,
    max_len: int = 1024,
    device=None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    desc: str = "score",
) -> list[list[float]]:
    """log p(completion EOS | prompt) of every completion for every prompt (the training encoding), summed
    over the completion's tokens in fp32. Collective when world > 1."""
    results = {}
    bar = _progress(len(prompts), desc, rank, progress)
    for batch in rank_batches(len(prompts), batch_size, rank, world):
        rows = []
        for i in batch or [0]:
            for completion in completions:
                row, _ = encode_pair(tok, prompts[i], completion, max_len)
                if row is None:
                    raise UserError(f"completion {completion!r} alone is longer than --max_len {max_len}")
                rows.append(row)
        inputs = {k: v.to(device) for k, v in collate(rows, tok.pad_token_id).items()}
        logits = (
            model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                position_ids=inputs["position_ids"],
            )
            .logits[:, :-1]
            .float()
        )
        labels = inputs["labels"][:, 1:]
        picked = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (picked * (labels != IGNORE_INDEX)).sum(dim=1).view(-1, len(completions)).tolist()
        if batch is None:
            continue
        results.update(zip(batch, sums))
        bar.update(min(len(batch) * world, bar.total - bar.n))
    bar.close()
    results = _gather(results, world)
    return [results[i] for i in range(len(prompts))]
