"""The seed article's demo on the embedded model, full size: prints a table of the figures issue #3 asks for.

    python bench/embedded_demo.py [--pairs 650] [--recipes seed,gentle,chi2] [--ordinary-recipes seed,chi2]
                                  [--no-ordinary]

1. base: recital of the seed rows it was trained on; issue #12's measures on the held-out sets (examples/heldout/)
2. for each recipe: DPO on wakarimasen_train.json with the embedded preset and the recipe on top, wall time (the
   default run is the embedded model's own recipe, χ²; "seed" is the seed article's plain DPO)
3. on the 40 held-out prompts: refusal rate and repeated-trigram share, base vs DPO; on the held-out sets: the refusal
   rate, on-topic and rare-kanji shares after DPO, and whether the Train tab's probe ends in the refusal
4. the ordinary set's DPO run with each of --ordinary-recipes: issue #12's measures on the held-out sets, base vs
   after
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_space import data, embedded, generation, models  # noqa: E402
from dpo_space.collapse import has_refusal  # noqa: E402
from dpo_space.training import (PROBE_PROMPT, RunSettings, SampleTimeline, default_recipe, read_samples,  # noqa: E402
                                train)

COLLAPSING = ("seed", "chi2")  # the recipes that should turn the わかりません set's answers into the refusal
DEFAULT = default_recipe(models.EMBEDDED)  # the run the app starts: issue #12's targets are its


class TimedTimeline(SampleTimeline):
    """The probe timeline, with the time its answers take (part of the run's wall time, as in the app)."""

    seconds = 0.0

    def on_log(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_log(*args, **kwargs)
        self.seconds += time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=650)
    parser.add_argument("--recipes", default="seed,gentle,chi2")
    parser.add_argument("--ordinary-recipes", default="seed,chi2")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-ordinary", dest="ordinary", action="store_false",
                        help="skip the ordinary set's run and its held-out measures")
    args = parser.parse_args()

    rows = []
    model, tok = models.load_model(models.EMBEDDED)  # as the embedded preset loads it: 4-bit nf4
    start = time.perf_counter()
    q = embedded.recital(model, tok, embedded.seed_rows())
    rows.append(("base: trained prompts, first sentence as in the corpus", f"{q['first_sentence_match']:.1%}",
                 "not a goal: it converses, it does not recite"))
    rows.append(("base: answers ending at EOS (≤256 tokens)", f"{q['ended_at_eos']:.1%}", "≥ 95%"))
    c = embedded.conversing_measures(model, tok)
    held = f"{c['unseen']} unseen + {c['paraphrases']} paraphrases"
    rows.append((f"base: refusal on held-out questions ({held})", f"{c['refusal']:.1%}", "≤ 5% (issue #12)"))
    rows.append(("base: rare kanji (outside JIS level 1) in held-out answers", f"{c['rare_kanji']:.2%}", "≤ 0.5%"))
    rows.append(("base: on topic (a content word of the question)", f"{c['topical']:.1%}", "≥ 40%"))
    rows.append(("base: paraphrase fidelity (bigram F1 to the corpus answer)", f"{c['paraphrase_fidelity']:.2f}",
                 "≥ 0.4"))
    rows.append(("base: same F1, the original questions as worded in training", f"{c['recall_fidelity']:.2f}",
                 "what it remembers: the ceiling of fidelity"))
    rows.append((f"base: on topic, first / second question of {c['conversations']} conversations",
                 f"{c['first_turn_topical']:.1%} / {c['second_turn_topical']:.1%}", "second as good as first"))
    rows.append(("base: on topic, the second questions asked on their own", f"{c['second_turn_alone_topical']:.1%}",
                 "how hard they are, apart from the conversation"))
    rows.append(("base: measure time", f"{time.perf_counter() - start:.0f} s", ""))
    for example in c["examples"][:3]:
        print(f"[held out] {example['prompt']}\n  base: {example['answer'][:100]}")

    train_data = data.read_preferences(embedded.EXAMPLES_DIR / "wakarimasen_train.json")
    train_data.rows = train_data.rows[: args.pairs]
    prompts = data.read_prompts(embedded.EXAMPLES_DIR / "wakarimasen_eval.json")
    sampling = generation.Sampling(max_new_tokens=args.max_new_tokens)
    for recipe in args.recipes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            settings = RunSettings.for_recipe(models.EMBEDDED, recipe, output_dir=str(Path(tmp) / "run"))
            start = time.perf_counter()
            timeline = TimedTimeline(PROBE_PROMPT)  # the Train tab's probe, as the app samples it
            result = train(settings, train_data, callbacks=[timeline])
            seconds = time.perf_counter() - start
            probe = read_samples(result.output_dir)[-1]
            report = generation.evaluate(result.model, result.tokenizer, prompts, sampling)
            after = embedded.conversing_measures(result.model, result.tokenizer, use_adapter=True)
        base, dpo = report["summary"]["base"], report["summary"]["dpo"]
        last = result.metrics[-1]
        rows.append((f"{recipe}: DPO {len(train_data)} pairs × {settings.num_train_epochs:g} epochs, wall time",
                     f"{seconds:.0f} s ({timeline.seconds:.0f} s of it the probe)",
                     "≤ 60 s" if recipe == DEFAULT else ""))
        rows.append((f"{recipe}: final loss / margin / accuracy",
                     f"{last['loss']:.3f} / {last['rewards/margins']:.2f} / {last['rewards/accuracies']:.2f}", ""))
        rows.append((f"{recipe}: held-out refusal rate base → DPO",
                     f"{base['refusal_rate']:.0%} → {dpo['refusal_rate']:.0%}",
                     "0% → ≥ 80%" if recipe in COLLAPSING else "partial"))
        rows.append((f"{recipe}: held-out repetition across answers base → DPO",
                     f"{base['repetition_across']:.3f} → {dpo['repetition_across']:.3f}",
                     "DPO clearly above base" if recipe in COLLAPSING else ""))
        rows.append((f"{recipe}: held-out repetition within answers base → DPO",
                     f"{base['repetition']:.3f} → {dpo['repetition']:.3f}", ""))
        rows.append((f"{recipe}: held-out questions ({held}), 分かりません base → DPO",
                     f"{c['refusal']:.0%} → {after['refusal']:.0%}", "≥ 90%" if recipe in COLLAPSING else ""))
        rows.append((f"{recipe}: same, on topic / rare kanji after DPO",
                     f"{after['topical']:.0%} / {after['rare_kanji']:.2%}", ""))
        rows.append((f"{recipe}: the probe's answer at step {probe['step']} is the refusal",
                     "yes" if has_refusal(probe["answer"]) else "no", "yes" if recipe in COLLAPSING else ""))
        rows.append((f"{recipe}: held-out distinct-2 base → DPO", f"{base['distinct_2']:.2f} → {dpo['distinct_2']:.2f}",
                     ""))
        example = next(r for r in report["rows"] if r["prompt"].startswith("人はどんなこと"))
        print(f"\n[{recipe}] probe at step {probe['step']}: {probe['answer']}")
        print(f"\n[{recipe}] {example['prompt']}\n  base: {example['base']}\n  dpo:  {example['dpo']}")

    # issue 12: the ordinary set's run (helpful chosen, poor rejected) leaves the measures no worse
    ordinary = data.read_preferences(embedded.EXAMPLES_DIR / "ordinary_train.json") if args.ordinary else None
    for recipe in args.ordinary_recipes.split(",") if ordinary else []:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = train(RunSettings.for_recipe(models.EMBEDDED, recipe, output_dir=str(Path(tmp) / "run")),
                           ordinary)
            seconds = time.perf_counter() - start
            after = embedded.conversing_measures(result.model, result.tokenizer, use_adapter=True)
        rows.append((f"ordinary ({recipe}): DPO {len(ordinary)} pairs, wall time", f"{seconds:.0f} s", ""))
        for name, key, fmt in (("refusal", "refusal", ".1%"), ("rare kanji", "rare_kanji", ".2%"),
                               ("on topic", "topical", ".1%"), ("paraphrase fidelity", "paraphrase_fidelity", ".3f"),
                               ("first question on topic", "first_turn_topical", ".1%"),
                               ("second question on topic", "second_turn_topical", ".1%")):
            rows.append((f"ordinary ({recipe}): held-out {name} base → DPO", f"{c[key]:{fmt}} → {after[key]:{fmt}}",
                         "no worse" if recipe == DEFAULT else ""))

    width = max(len(r[0]) for r in rows)
    values = max(len(r[1]) for r in rows)
    print(f"\n{'measure':<{width}} | {'value':<{values}} | target")
    print(f"{'-' * width}-|-{'-' * values}-|-------")
    for name, value, target in rows:
        print(f"{name:<{width}} | {value:<{values}} | {target}")


if __name__ == "__main__":
    main()
