"""PEFT's modules_to_save: modules trained in full beside the LoRA (an LM head, embeddings grown by --add_tokens).

PEFT trains a copy beside the frozen original (`ModulesToSaveWrapper`); here the module itself is unfrozen, since
the frozen base is never saved (lora_ds.checkpoint) and a copy would only double its memory. Under ZeRO-3 its
params stay partitioned like every base weight, and the optimizer holds their fp32 masters and Adam moments in its
partitions beside the LoRA factors', so checkpoints, resume and export-adapter treat them as they treat the
factors. The adapter holds each in full under PEFT's key, `base_model.model.<module>.<param>`
(lora_ds.adapter), and `lora-ds merge` writes it in place of the base's tensor.

A model whose input embedding and output head share one matrix (tie_word_embeddings) keeps them shared: training
either trains both, as PEFT does with `ensure_weight_tying`; the adapter then holds the matrix under both names.
"""

from __future__ import annotations

from torch import nn

from lora_ds.config import FieldError

FIELD = "lora.modules_to_save"


def is_saved(name: str, modules_to_save) -> bool:
    """PEFT's rule (`_set_trainable`): a module is saved when its name ends with one of the entries."""
    return any(name.endswith(entry) for entry in modules_to_save or ())


def select(model: nn.Module, modules_to_save: list[str], adapted: list[str]) -> list[str]:
    """The modules of `model` (LoRA already injected: `adapted`) that `modules_to_save` selects, outermost only.
    Refuses an entry that selects nothing and a module that is both trained in full and adapted."""
    inner = tuple(f"{a}." for a in adapted)  # a LoRA layer's own parts (base_layer, lora_A...) are not candidates
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inner) and is_saved(n, modules_to_save)]
    names = [n for n in names if not any(n.startswith(f"{outer}.") for outer in names)]
    for entry in modules_to_save:
        if not any(n.endswith(entry) for n in names):
            raise FieldError(FIELD, entry, "selects no module of this model (an entry matches the end of a name)")
    for name in names:
        overlap = [a for a in adapted if a == name or a.startswith(f"{name}.")]
        if overlap:
            raise FieldError(
                FIELD,
                name,
                f"is also adapted by --lora_targets ({overlap[0]}); a module is trained either in full or with LoRA "
                "(PEFT leaves modules_to_save out of target_modules): drop it from one of the two",
            )
    return names


def unfreeze(model: nn.Module, names: list[str]) -> dict:
    """Make every param of the modules `names` trainable. Returns {"<module>.<param>": Parameter} in model order,
    a param shared by two modules (tied embeddings) once, under its first name."""
    wanted = {id(p) for name in names for p in model.get_submodule(name).parameters()}
    params = {}
    for name, p in model.named_parameters():
        if id(p) in wanted:
            p.requires_grad_(True)
            params[name] = p
    return params


def tied_names(model: nn.Module, params: dict) -> dict:
    """{"<head>.weight": "<embedding>.weight"}: the other name of a trained matrix that input and output embeddings
    share (PEFT saves it under both)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embedding.weight:
        return {}
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    first = next((n for n, p in params.items() if p is embedding.weight), None)
    if first is None:
        return {}
    other = {f"{names[id(head)]}.weight", f"{names[id(embedding)]}.weight"} - {first}
    return {name: first for name in other}


def embedding_entries(model: nn.Module) -> list[str]:
    """modules_to_save entries of the input embedding and output head (e.g. embed_tokens, lm_head): their last
    names where those select only them, else their full names."""
    names = {id(m): n for n, m in model.named_modules()}
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    full = [names[id(m)] for m in modules if m is not None and id(m) in names]
    entries = []
    for name in dict.fromkeys(full):
        short = name.rsplit(".", 1)[-1]
        selected = [n for n in names.values() if n.endswith(short)]
        entries.append(short if selected == [name] else name)
    return entries
