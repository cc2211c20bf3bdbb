"""Train arx-tiny, the embedded default model, on the CPU from self-made text.

    python scripts/train_default_model.py --out models/arx-tiny          # the shipped run
    python scripts/train_default_model.py --steps 60 --out /tmp/smoke    # a smoke run

Steps: generate the corpus (scripts/make_corpus.py, seeded), train a byte-level BPE tokenizer
(`tokenizers`), wrap it as an HF fast tokenizer, train a small Llama (GQA, RoPE, RMSNorm, tied
embeddings) with AdamW + warmup + cosine, then save config, generation config, safetensors
weights, tokenizer, calib/eval fixtures and train_metrics.json. Seeded: with the same torch
version and thread count the run is reproducible.

The tokenizer's post-processor prepends <s> (add_special_tokens=True), both through
transformers and through the bare `tokenizers` library, so every runtime sees the same ids.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Special tokens and their fixed ids: the tokenizer trainer assigns ids in this order.
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class TrainOptions:
    seed: int = 0
    steps: int = 3000
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    corpus_mb: float = 8.0
    vocab_size: int = 2048
    threads: int = 1
    eval_every: int = 250
    eval_batches: int = 8

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or not 16 <= self.seq_len <= 512:
            raise ValueError("need steps >= 1, batch >= 1 and 16 <= seq_len <= 512")
        if self.warmup >= self.steps:
            object.__setattr__(self, "warmup", max(1, self.steps // 10))


def model_config(vocab_size: int):
    """The shipped shape: ~2.9M parameters, ~11.8 MB as fp32 safetensors."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=576,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,  # GQA 4:1
        max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,  # saves vocab*hidden = 0.5M parameters (2 MB)
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE: any UTF-8 text (code, CJK, emoji) encodes without <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    assert [tok.token_to_id(t) for t in (PAD, BOS, EOS)] == [PAD_ID, BOS_ID, EOS_ID]
    # <s> first, as Llama does; pairs are not used by causal LMs but must be defined.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    return tok


def hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=512, clean_up_tokenization_spaces=False)


def token_stream(tok, docs: list[str]):
    """One long 1-D tensor: <s> doc </s> <s> doc </s> ... (documents packed, no padding)."""
    import torch

    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)  # starts with <s> (post-processor)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def batch_at(stream, starts, seq_len: int):
    import torch

    rows = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]  # (B, T) inputs, (B, T) next-token targets


def lr_at(step: int, opt: TrainOptions) -> float:
    """Linear warmup, then cosine down to min_lr_ratio * lr."""
    if step < opt.warmup:
        return opt.lr * (step + 1) / opt.warmup
    t = (step - opt.warmup) / max(1, opt.steps - opt.warmup)
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, opt: TrainOptions):
    import torch

    # No weight decay on norms (1-D): decaying a gain towards 0 only fights the data.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(0.9, 0.95), eps=1e-8)


def evaluate(model, stream, opt: TrainOptions, seed: int) -> float:
    """Mean next-token loss on fixed windows of ``stream`` (same windows every call)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(opt.eval_batches):
            starts = torch.randint(0, len(stream) - opt.seq_len - 1, (opt.batch,), generator=g)
            x, y = batch_at(stream, starts, opt.seq_len)
            logits = model(input_ids=x).logits
            losses.append(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def train(model, train_ids, eval_ids, opt: TrainOptions) -> dict:
    import torch

    g = torch.Generator().manual_seed(opt.seed)
    optim = make_optimizer(model, opt)
    history, t0, tokens = [], time.time(), 0
    for step in range(opt.steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, opt)
        starts = torch.randint(0, len(train_ids) - opt.seq_len - 1, (opt.batch,), generator=g)
        x, y = batch_at(train_ids, starts, opt.seq_len)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        tokens += x.numel()
        last = step == opt.steps - 1
        if step % 20 == 0 or last:
            el = time.time() - t0
            eta = el / (step + 1) * (opt.steps - step - 1)
            print(f"step {step:5d}/{opt.steps} loss {loss.item():.4f} lr {lr_at(step, opt):.2e} "
                  f"{tokens / el:7.0f} tok/s elapsed {el / 60:5.1f} min eta {eta / 60:5.1f} min",
                  flush=True)
        if (step + 1) % opt.eval_every == 0 or last:
            ev = evaluate(model, eval_ids, opt, seed=1)
            tr = evaluate(model, train_ids, opt, seed=2)
            history.append({"step": step + 1, "train_loss": tr, "eval_loss": ev})
            print(f"  eval step {step + 1}: train {tr:.4f} (ppl {math.exp(tr):.2f}) "
                  f"held-out {ev:.4f} (ppl {math.exp(ev):.2f})", flush=True)
    return {"history": history, "train_seconds": time.time() - t0, "tokens_seen": tokens}


def unigram_loss(train_ids, eval_ids, vocab_size: int) -> float:
    """Held-out loss of a unigram model (add-one smoothed): the floor a real LM must beat."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[eval_ids[1:]].mean())


def samples(model, tokenizer, prompts: list[str], seed: int) -> list[dict]:
    import torch

    out = []
    for prompt in prompts:
        x = tokenizer(prompt, return_tensors="pt")
        greedy = model.generate(**x, max_new_tokens=60, do_sample=False)
        torch.manual_seed(seed)
        sampled = model.generate(**x, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40)
        out.append({"prompt": prompt,
                    "greedy": tokenizer.decode(greedy[0], skip_special_tokens=True),
                    "sampled": tokenizer.decode(sampled[0], skip_special_tokens=True)})
    return out


def save(out: Path, model, tokenizer, metrics: dict) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # config.json + model.safetensors
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                     max_length=512).save_pretrained(out)
    tokenizer.save_pretrained(out)
    portable_tokenizer_class(out)
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def portable_tokenizer_class(out: Path) -> None:
    """Name the class every transformers version knows (v5 writes its new TokenizersBackend,
    which v4 and converters such as onnxruntime-extensions do not recognise); v5 loads
    PreTrainedTokenizerFast as TokenizersBackend, so nothing changes there."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def parse_args() -> tuple[TrainOptions, Path]:
    ap = argparse.ArgumentParser(description="Train the arx-tiny default model on the CPU.")
    ap.add_argument("--out", type=Path, default=Path("models/arx-tiny"))
    defaults = TrainOptions()
    for name, value in asdict(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = vars(ap.parse_args())
    out = args.pop("out")
    return TrainOptions(**args), out


def main() -> None:
    opt, out = parse_args()
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_corpus

    torch.set_num_threads(opt.threads)  # the build machine is small and shared
    random.seed(opt.seed)
    torch.manual_seed(opt.seed)
    train_docs = make_corpus.documents(make_corpus.TRAIN_SEED + opt.seed, int(opt.corpus_mb * 1e6))
    eval_docs = make_corpus.documents(make_corpus.EVAL_SEED, 300_000)
    tok = train_tokenizer(train_docs, opt.vocab_size)
    train_ids, eval_ids = token_stream(tok, train_docs), token_stream(tok, eval_docs)
    print(f"corpus: {len(train_docs)} docs, {len(train_ids)} train tokens, "
          f"{len(eval_ids)} held-out tokens", flush=True)
    model = LlamaForCausalLM(model_config(opt.vocab_size))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    result = train(model, train_ids, eval_ids, opt)
    model.eval()
    tokenizer = hf_tokenizer(tok)
    metrics = {"options": asdict(opt), "parameters": n_params, **result,
               "unigram_eval_loss": unigram_loss(train_ids, eval_ids, opt.vocab_size),
               "torch": torch.__version__,
               "samples": samples(model, tokenizer, ["Once upon a time", "def add(a, b):",
                                                     "Lily had five apples."], opt.seed)}
    save(out, model, tokenizer, metrics)
    make_corpus.write_fixtures(out)
    for s in metrics["samples"]:
        print(json.dumps(s, indent=1))
    print(f"saved to {out}", flush=True)


if __name__ == "__main__":
    main()
