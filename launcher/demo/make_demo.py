"""Regenerate the demo's sample task and tokenizer (deterministic; the outputs are committed).

    python launcher/demo/make_demo.py

The task is WikiSQL-shaped: a table schema and a question in, the SQL out. The facts are made up;
the point is a sample small enough to ship that a tiny model visibly learns within a few dozen steps.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
CITIES = ["Aldport", "Brindle", "Corvale", "Dunmere", "Eastwick", "Farrow", "Glenhollow", "Harwick", "Ivydale",
          "Jasper Bay", "Kingsmoor", "Larkfield", "Marlow", "Northgate", "Oakridge", "Pinecrest", "Queensbury",
          "Ravenhill", "Stonebridge", "Thornbury", "Umberton", "Valewood", "Westmere", "Yarrow", "Zephyr Point"]
COLUMNS = {"population": "real", "mayor": "text", "founded": "real", "river": "text", "region": "text"}
QUESTIONS = {
    "population": ("How many people live in {c}?", "SELECT population FROM table WHERE city = {c}"),
    "mayor": ("Who is the mayor of {c}?", "SELECT mayor FROM table WHERE city = {c}"),
    "founded": ("When was {c} founded?", "SELECT founded FROM table WHERE city = {c}"),
    "river": ("Which river runs through {c}?", "SELECT river FROM table WHERE city = {c}"),
    "region": ("In which region is {c}?", "SELECT region FROM table WHERE city = {c}"),
}
AGG = [("How many cities are in the {r} region?", "SELECT COUNT city FROM table WHERE region = {r}"),
       ("What is the largest population in the {r} region?", "SELECT MAX population FROM table WHERE region = {r}")]
REGIONS = ["North", "South", "Coast", "Highlands", "Plains"]


def examples(rng: random.Random, n: int):
    out = []
    for _ in range(n):
        cols = rng.sample(sorted(COLUMNS), 3)
        schema = "city (text) | " + " | ".join(f"{c} ({COLUMNS[c]})" for c in cols)
        if rng.random() < 0.2:
            region = rng.choice(REGIONS)
            question, sql = (s.format(r=region) for s in rng.choice(AGG))
            schema = "city (text) | population (real) | region (text)"
        else:
            col = rng.choice(cols)
            city = rng.choice(CITIES)
            question, sql = (s.format(c=city) for s in QUESTIONS[col])
        out.append({"prompt": f"Table: {schema}\nQuestion: {question}\nSQL:", "completion": f" {sql}"})
    return out


def train_tokenizer(texts, out_dir: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(out_dir)


def main():
    rng = random.Random(1234)
    train, held_out = examples(rng, 480), examples(rng, 64)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(os.path.join(HERE, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    train_tokenizer([r["prompt"] + r["completion"] for r in train], os.path.join(HERE, "tokenizer"))


if __name__ == "__main__":
    main()
