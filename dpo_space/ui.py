"""The Gradio skin: tabs wired to engine calls. No ML and no policy here: every handler calls `dpo_space` (the
Space's rules live in `space`, the run settings in `training.RunSettings`)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import tempfile
from inspect import isgeneratorfunction
from pathlib import Path

import gradio as gr
import pandas as pd

from . import collapse, data, generation, gpu, memory, models, space, training
from .errors import DataError, DPOSpaceError
from .learn import LEARN_EN, LEARN_JA
from .space import Limits
from .workbench import ACTIVE, Workbench, check_visitor, new_visitor_id

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

i18n = gr.I18n(
    ja={
        "data": "データ", "train": "学習", "compare": "比較", "evaluate": "評価", "learn": "解説",
        "example": "サンプルデータ", "load_example": "読み込む", "upload": "JSON / JSONL をアップロード",
        "rows": "選好データ (prompt / chosen / rejected)", "download": "データをダウンロード",
        "report": "検証結果", "extreme": "極端なデータを作る (元記事の方法)",
        "extreme_prompts": "質問 (1行に1つ)", "extreme_chosen": "chosen に入れる固定の回答",
        "extreme_build": "ベースモデルの回答で rejected を埋める", "model": "モデル", "recipe": "レシピ",
        "recipe_info": "内蔵モデルは「χ² 正則化」から始まります(通常のデータで学習しても、モデルが知っていることを保つため)。"
                       "元記事の素の DPO は「元記事の設定」。違いは「解説」タブ",
        "epochs": "エポック数", "advanced": "詳細設定", "start": "学習開始", "stop": "停止",
        "status": "状態", "samples": "学習中の回答の変化", "push": "Hub にアダプタを公開",
        "token": "Hub トークン (書き込み権限)", "repo": "リポジトリ名 (user/name)", "prompt": "質問",
        "send": "送信", "clear": "クリア", "sampling": "生成の設定", "base": "ベースモデル",
        "compare_examples": "どの学習にもない質問 (DPO にも組み込みモデルの SFT にもない; 後の 2 つは元記事の評価用の質問)",
        "dpo": "DPO モデル", "run_eval": "評価を実行", "eval_prompts": "評価用の質問 (1行に1つ; 空なら評価セット)",
        "inspect": "選好ペアを調べる", "collect": "ブラウザで選好ペアを集める (選好ゲーム)",
        "two_answers": "ベースモデルに 2 回答えさせる", "game": "10 問のゲームを始める", "pick_a": "A のほうが良い",
        "pick_b": "B のほうが良い", "own_answer": "自分で書いた、より良い回答", "pick_own": "自分の回答を chosen にする",
        "game_train": "集めたペアで学習する", "pick_runs": "比べる学習 (最大 2 つ)",
        "pick_runs_info": "空なら最新の学習。2 つ選ぶと列が 1 つ増えます (同じ seed・同じ生成設定)。",
        "second_run": "DPO モデル (2 つ目)", "eval_k": "質問ごとのサンプル数 K",
        "eval_k_info": "最初の 8 問を温度 1 で K 回ずつ: 多様性と KL の推定 (0 で省略)", "token_audit": "トークン長を調べる",
        "token_audit_run": "「学習」タブで選んだモデルのトークナイザで数える", "max_pairs": "使うペア数の上限",
        "probe": "途中経過を見る質問",
        "intro": "Direct Preference Optimization (DPO) で言語モデルがどう変わるかを見る: 選好データ → 4-bit QLoRA DPO → "
                 "ベースモデルと DPO モデルを並べて比較。モード崩壊も含めて。",
        "shared": "*共有 Space では学習の規模に上限があります。Space を複製 (Duplicate) すると上限が外れます。*",
        "learn_text": LEARN_JA,
    },
    en={
        "data": "Data", "train": "Train", "compare": "Compare", "evaluate": "Evaluate", "learn": "Learn",
        "example": "Example dataset", "load_example": "Load", "upload": "Upload JSON / JSONL",
        "rows": "Preference pairs (prompt / chosen / rejected)", "download": "Download dataset",
        "report": "Validation", "extreme": "Build an extreme dataset (the seed's way)",
        "extreme_prompts": "Prompts (one a line)", "extreme_chosen": "Fixed answer for every chosen",
        "extreme_build": "Fill rejected with the base model's answers", "model": "Model", "recipe": "Recipe",
        "recipe_info": "The embedded model starts from the χ² recipe (a run on ordinary data then keeps what the model "
                       "knows); the seed's plain DPO is 'seed article'. The difference: the Learn tab",
        "epochs": "Epochs", "advanced": "Advanced", "start": "Start training", "stop": "Stop",
        "status": "Status", "samples": "The probe answer as training goes", "push": "Push the adapter to the Hub",
        "token": "Hub token (write)", "repo": "Repository (user/name)", "prompt": "Prompt", "send": "Send",
        "compare_examples": ("Questions no training step saw (neither a DPO run nor the embedded model's SFT; the "
                             "last two: the seed article's held-out prompts)"),
        "clear": "Clear", "sampling": "Sampling", "base": "Base model", "dpo": "DPO model",
        "run_eval": "Run evaluation", "eval_prompts": "Prompts (one a line; empty: the eval set)",
        "inspect": "Inspect preference pairs", "collect": "Collect pairs in the browser (preference game)",
        "two_answers": "Two answers from the base model", "game": "Start a game of ten prompts", "pick_a": "A is better",
        "pick_b": "B is better", "own_answer": "Your own, better answer", "pick_own": "Make my answer the chosen one",
        "game_train": "Train on my pairs", "pick_runs": "Runs to compare (at most two)",
        "pick_runs_info": "Empty: your latest run. Two: a third column (same seed, same sampling).",
        "second_run": "DPO model (second run)", "eval_k": "Samples per prompt (K)",
        "eval_k_info": "The first 8 prompts, K times each at temperature 1: diversity and the KL estimate (0: skip)",
        "token_audit": "Token lengths", "token_audit_run": "Count with the tokenizer of the model picked in the Train tab",
        "max_pairs": "At most this many pairs", "probe": "Probe prompt",
        "intro": "See what Direct Preference Optimization does to a language model: preference data → 4-bit QLoRA DPO → "
                 "the base and the DPO model side by side, mode collapse included.",
        "shared": "*Shared Space: runs are capped. Duplicate the Space to lift the caps.*",
        "learn_text": LEARN_EN,
    },
)

EXAMPLE_FILES = {
    "わかりません (seed, extreme)": "wakarimasen_train.json",
    "ordinary: helpful vs curt / wrong / rude": "ordinary_train.json",
}
RECIPE_LABELS = {
    "seed": "元記事の設定 / seed article",
    "t4_safe": "T4 で安全に / safe on a T4",
    "overtrain": "過学習で崩壊を見る / over-train to see collapse",
    "remedies": "崩壊の対策: β↑ + SFT 項 / remedies: higher β + SFT term",
    "ipo": "崩壊の対策: IPO / remedies: IPO",
    "gentle": "穏やかに (β 0.5, 1 エポック) / gentle",
    "chi2": "χ² 正則化 (f-DPO α 2, 学習率 ×3) / χ² regulariser",
}
LOSSES = {"sigmoid (DPO)": ["sigmoid"], "ipo": ["ipo"], "hinge": ["hinge"], "robust": ["robust"],
          "sigmoid + sft": ["sigmoid", "sft"]}
CHART_HELP = {
    "margin": "Reward margin = reward(chosen) − reward(rejected). It grows while the model learns the preference.",
    "accuracy": "Share of pairs in the batch whose chosen reward beats the rejected one.",
    "rewards": "Implicit rewards β·log πθ/πref. Under plain DPO a falling chosen reward is normal while the margin "
               "grows: the rejected answer is pushed down faster. Under χ² (where the embedded model starts) pushing "
               "the rejected answer down gains little (its score cannot fall below −β): the chosen reward rises.",
    "logps": "log πθ(chosen) and log πθ(rejected), summed over each answer's tokens. Both may fall while the margin "
             "grows (likelihood displacement, see Learn): the probability goes to answers in neither column.",
}

# The Train tab's run settings, each widget keyed by its RunSettings field (TRL's name): what a visitor sets is what
# TRL gets (tests/test_ui.py checks that each one changes DPOConfig, LoraConfig, BitsAndBytesConfig or the rows).
UP_FRONT = ("beta", "lora_r", "num_train_epochs")
ADVANCED = ("lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_length", "warmup_steps", "loss_type", "loss_weights",
            "f_divergence_type", "f_alpha_divergence_coef", "seed",
            "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "gradient_checkpointing", "precision",
            "system_prompt", "report_to")
SETTINGS = UP_FRONT + ADVANCED
# Settings shown only while another one's widget value is in play: (that setting, shown when)
SHOWN_WITH = {"loss_weights": ("loss_type", lambda loss: len(LOSSES[loss]) == 2),  # the SFT weight: the two-term loss
              "f_alpha_divergence_coef": ("f_divergence_type", lambda kind: kind == "alpha_divergence")}
TARGET_MODULES = list(models.LLAMA_LINEAR)
INTEGERS = ("lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed")


def setting_widget(name: str, value, epochs_cap: float = 10, visible: bool = True):
    """The widget for one RunSettings field, labelled with the field's own name (TRL's) where it is technical;
    `visible` for the settings of SHOWN_WITH."""
    if name == "beta":
        return gr.Slider(0.01, 1.0, value=value, step=0.01, label="beta (β)")
    if name == "lora_r":
        return gr.Slider(1, 64, value=value, step=1, label="LoRA rank (lora_r)")
    if name == "num_train_epochs":
        return gr.Slider(0.25, epochs_cap, value=value, step=0.25, label=i18n("epochs"))
    if name == "lora_target_modules":
        return gr.CheckboxGroup(TARGET_MODULES, value=value, label=name)
    if name == "loss_type":
        return gr.Dropdown(list(LOSSES), value=value, label=name)
    if name == "loss_weights":  # shown only for the two-term loss, the one it weighs (SHOWN_WITH)
        return gr.Number(value, label="SFT weight (loss_weights)", visible=visible)
    if name == "f_divergence_type":
        return gr.Dropdown(list(training.F_DIVERGENCES), value=value, label=name,
                           info="reverse_kl: DPO's own; alpha_divergence with α 2: χ², see Learn")
    if name == "f_alpha_divergence_coef":  # shown only for the divergence it sets (SHOWN_WITH)
        return gr.Number(value, label="α (f_alpha_divergence_coef)", visible=visible)
    if name == "precision":
        return gr.Dropdown(list(training.PRECISIONS), value=value, label=name)
    if name == "bnb_4bit_quant_type":
        return gr.Dropdown(["nf4", "fp4"], value=value, label=name)
    if name in ("load_in_4bit", "use_bnb_nested_quant", "gradient_checkpointing"):
        return gr.Checkbox(value, label=name)
    if name == "system_prompt":
        return gr.Textbox(value, label=name)
    if name == "report_to":  # the trackers installed here; none is never required
        import importlib.util

        shown = [r for r in training.REPORTERS if r == "none" or importlib.util.find_spec(r) is not None]
        return gr.Dropdown(shown, value=value, label=name, info="trackio: `trackio show --project dpo-space`")
    return gr.Number(value, label=name, precision=0 if name in INTEGERS else None)


def widget_values(settings: training.RunSettings) -> list:
    """RunSettings → the widgets' values, in SETTINGS order."""
    def shown_value(name):
        value = getattr(settings, name)
        if name == "loss_type":
            return next((label for label, v in LOSSES.items() if v == value), "sigmoid (DPO)")
        if name == "loss_weights":
            return (value or [1.0, 1.0])[-1]
        if name == "max_length":
            return value or 1024
        return "" if value is None else value

    return [shown_value(name) for name in SETTINGS]


def settings_values(values: list | tuple) -> dict:
    """The widgets' values, in SETTINGS order → RunSettings fields."""
    out = dict(zip(SETTINGS, values, strict=True))
    out["loss_type"] = LOSSES[out["loss_type"]]
    out["loss_weights"] = [1.0, float(out["loss_weights"])] if len(out["loss_type"]) == 2 else None
    out["lora_target_modules"] = list(out["lora_target_modules"] or [])
    out["system_prompt"] = out["system_prompt"] or None
    return out


def is_shown(name: str, values: dict) -> bool:
    """Whether a setting's widget shows, given every widget's value (SHOWN_WITH; the rest always show)."""
    parent, shown_when = SHOWN_WITH.get(name, (None, None))
    return parent is None or shown_when(values[parent])


def recipe_values(model: str, recipe: str) -> list:
    """Every settings widget as the model's preset and the recipe set it (the SFT weight shown for its loss only)."""
    settings = training.RunSettings.for_recipe(model, recipe if recipe in training.RECIPES else "seed")
    values = dict(zip(SETTINGS, widget_values(settings), strict=True))
    return [gr.update(value=v, visible=is_shown(name, values)) if name in SHOWN_WITH else v
            for name, v in values.items()]


def model_values(model: str) -> list:
    """A change of model: the recipe its runs start from (`training.default_recipe`), then every settings widget."""
    recipe = training.default_recipe(model)
    return [recipe, *recipe_values(model, recipe)]


def loss_caption(loss_type: list[str]) -> str:
    """Where the loss chart starts, for the loss that is training: log 2 is the plain sigmoid loss's start only."""
    start = {"sigmoid": "log 2 ≈ 0.693 (no preference yet)", "robust": "about log 2 ≈ 0.693",
             "hinge": "1 (no margin yet)", "ipo": "1/(2β)², the square of the margin IPO aims at",
             "sft": "the chosen answers' mean NLL (the SFT term)"}
    first = " + weighted ".join(start.get(t, t) for t in loss_type)
    return f"Loss ({' + '.join(loss_type)}): starts at {first}, and falls as the model separates the pairs."


# ---------------------------------------------------------------- handlers (each a thin call into the engine)


def shown(handler):
    """Every handler, generators included: an engine error (DPOSpaceError, whose message names what and where) reaches
    the page as that message; Gradio would show other exceptions as a bare "Error"."""
    if isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except DPOSpaceError as e:
                raise gr.Error(str(e)) from None
        return stream

    @functools.wraps(handler)
    def call(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except DPOSpaceError as e:
            raise gr.Error(str(e)) from None
    return call


def rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    def cell(v):
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)

    return pd.DataFrame([[cell(r["prompt"]), cell(r["chosen"]), cell(r["rejected"])] for r in rows],
                        columns=list(data.FIELDS))


def frame_to_rows(frame: pd.DataFrame) -> list[dict]:
    def value(v):
        v = "" if v is None or (isinstance(v, float) and pd.isna(v)) else v
        if isinstance(v, str) and v.lstrip().startswith("[{"):
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                return v
        return v

    return [{k: value(v) for k, v in zip(data.FIELDS, row, strict=False)} for row in frame.itertuples(index=False)
            if any(str(x).strip() for x in row if x is not None)]


def describe(pairs: data.PreferenceData) -> str:
    """Counts and the length-bias warning."""
    if not len(pairs):
        return "0 pairs"

    def length(v):
        return len(v) if isinstance(v, str) else sum(len(m["content"]) for m in v)

    chosen = [length(r["chosen"]) for r in pairs.rows]
    rejected = [length(r["rejected"]) for r in pairs.rows]
    longer = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    text = (f"**{len(pairs)} pairs** ({'conversational' if pairs.conversational else 'standard'}) · "
            f"mean length chosen {sum(chosen) / len(chosen):.0f} / rejected {sum(rejected) / len(rejected):.0f} chars")
    if longer >= 0.8 or longer <= 0.2:
        side = "longer" if longer >= 0.8 else "shorter"
        text += (f"\n\n**Warning — length bias**: chosen is {side} than rejected in {max(longer, 1 - longer):.0%} of pairs. "
                 "DPO may learn length instead of quality (a shorter chosen teaches short answers).")
    if pairs.dropped:
        text += "\n\nDropped: " + "; ".join(map(str, pairs.dropped[:10]))
    return text


def problems_markdown(error: DataError) -> str:
    lines = [f"- {error.source}: {p}" for p in error.problems]
    if error.more:
        lines.append(f"- … and {error.more} more problem(s)")
    return "**The data was not changed.** Problems found:\n" + "\n".join(lines)


def compare_examples() -> list[list[str]]:
    """Questions to start Compare from that no training step saw: four of examples/heldout/unseen.jsonl, then the
    seed article's held-out prompts 2 and 3 (the わかりません set's first evaluation prompts). All six are kept out of
    the embedded model's SFT and of both DPO sets; tests/test_embedded.py holds it."""
    return [[p] for p in [*UNSEEN_EXAMPLES, *data.read_prompts(EXAMPLES / "wakarimasen_eval.json")[:2]]]


UNSEEN_EXAMPLES = ("茶碗蒸しにすが立たないようにするにはどうすればいいですか?", "蒸発と沸騰の違いは何ですか?",
                   "潮の満ち引きが起こるのはなぜですか?", "利息と利子の違いは何ですか?")


def load_example(name: str):
    pairs = data.read_preferences(EXAMPLES / EXAMPLE_FILES[name])
    return pairs.rows, rows_to_frame(pairs.rows), describe(pairs)


def upload_file(path: str | None, rows: list[dict]):
    """A rejected upload leaves the current dataset (state and table) exactly as it was."""
    if not path:
        return gr.update(), gr.update(), gr.update()
    raw = Path(path).read_bytes() if os.path.getsize(path) <= data.Limits().max_bytes else None
    name = Path(path).name.split("/")[-1]
    try:
        if raw is None:
            raise DataError(name, [data.Problem(f"the file is over the cap of "
                                                f"{data.Limits().max_bytes // 2**20} MiB (max_bytes)")])
        pairs = data.read_preferences(raw, name=name)
    except DataError as e:
        return gr.update(), gr.update(), problems_markdown(e)
    note = f" (read as {pairs.encoding})" if pairs.encoding == "cp932" else ""
    return pairs.rows, rows_to_frame(pairs.rows), f"{name}{note}: " + describe(pairs)


def apply_edits(frame: pd.DataFrame, rows: list[dict]):
    try:
        pairs = data.validate_rows(frame_to_rows(frame), source="table")
    except DataError as e:
        return gr.update(), problems_markdown(e)
    return pairs.rows, describe(pairs)


def download_dataset(rows: list[dict]) -> str:
    folder = Path(tempfile.mkdtemp(prefix="dpo-space-"))
    return str(data.write_json(rows, folder / "preferences.json"))


def build_extreme(bench: Workbench, limits: Limits, prompts_text: str, chosen: str,
                  progress=gr.Progress(track_tqdm=True)):
    prompts = [p.strip() for p in prompts_text.split("\n") if p.strip()][: limits.max_pairs]
    if not prompts or not chosen.strip():
        raise DPOSpaceError("Give at least one prompt and the fixed chosen answer.")
    answers = bench.base_answers(prompts, generation.Sampling())
    rows = [{"prompt": p, "chosen": chosen, "rejected": a} for p, a in zip(prompts, answers, strict=True)
            if a.strip() and a != chosen]
    pairs = data.validate_rows(rows, source="built", drop_invalid=True)
    return pairs.rows, rows_to_frame(pairs.rows), describe(pairs)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_id: str):
    return models.load_tokenizer(model_id)


def tokenizer_for(bench: Workbench, model_key: str):
    """The tokenizer of the model picked in the Train tab: the chat model's own when it is that one, else loaded from
    the Hub (a few files, no weights)."""
    preset = models.PRESETS.get(model_key)
    model_id = preset.model_id if preset else model_key
    if model_id == bench.model_id or model_key == getattr(models.preset_for(bench.model_id), "key", None):
        return gpu.chat_model().tokenizer
    try:
        return _tokenizer(model_id)
    except Exception as e:  # noqa: BLE001 - offline, a typo, a gated repo: said, never a traceback
        raise DPOSpaceError(f"model: could not load the tokenizer of {model_id!r} ({type(e).__name__}: {e})") from None


def token_audit(bench: Workbench, rows: list[dict], model_key: str, max_length, system_prompt) -> str:
    """The Data tab's token-length audit, with the picked model's tokenizer, as the run would tokenize the pairs."""
    if not rows:
        raise DPOSpaceError("No data: pick an example or upload a file first.")
    tokenizer = tokenizer_for(bench, model_key)
    max_length = int(max_length) if max_length else None
    audit = generation.token_lengths(tokenizer, rows, system_prompt or None, max_length)
    head = "| tokens | p50 | p90 | p99 | max |\n|---|---|---|---|---|\n"
    body = "".join(f"| {key} | {c['p50']:.0f} | {c['p90']:.0f} | {c['p99']:.0f} | {c['max']} |\n"
                   for key, c in audit["columns"].items())
    cut = (f"**max_length {max_length} cuts {audit['cut']:.0%} of the {audit['pairs']} pairs** (prompt + the longer "
           "answer is longer; TRL keeps the start, so those answers lose their ends)." if max_length else
           "max_length is off: nothing is cut.")
    return f"Token lengths with the tokenizer of **{model_key}** ({audit['pairs']} pairs):\n\n{head}{body}\n{cut}"


# ---------------------------------------------------------------- pairs collected in the browser (on-policy data)

GAME_LENGTH = 10


@functools.lru_cache(maxsize=1)
def _game_pool() -> tuple[str, ...]:
    from . import corpus, embedded

    rows = embedded.read_corpus()
    excluded = embedded.excluded_from_sft(rows)
    seeds = {r["prompt"] for r in embedded.seed_rows()}  # the seed's rows feed its datasets: not these games
    return tuple(sorted({r["prompt"] for r in rows if corpus.key(r["prompt"]) not in excluded
                         and r["prompt"] not in seeds}))


def game_prompts(seed: int, n: int = GAME_LENGTH) -> list[str]:
    """n everyday questions from the corpus for a preference game: never from the held-out sets or the seed's
    evaluation prompts (the game's pairs train a run, and held out means held out)."""
    import random

    pool = _game_pool()
    return random.Random(seed).sample(pool, min(n, len(pool)))


# A question the model knows by heart comes back word for word twice at 0.9 (the embedded model's game prompts are its
# corpus questions; built from seven wordings a question: 6 of 40 at 0.9, then 4 at 1.1, 1 at 1.3, none at 1.5 or
# 1.7): the second answer is drawn again, hotter
HOTTER = (1.1, 1.3, 1.5, 1.7)


def two_answers(bench: Workbench, limits: Limits, answers: space.RateLimit, visitor, prompt: str, seed=0):
    """The base model's two answers to one prompt: two samples drawn in turn with one seed (a batch of two), the
    second drawn again, hotter and with another seed, while it equals the first (identical answers make no pair)."""
    answers.check(check_visitor(visitor))
    if not prompt or not prompt.strip():
        raise DPOSpaceError("Type a prompt first (or start a game).")
    sampling = generation.Sampling(temperature=0.9, top_p=0.95, max_new_tokens=min(128, limits.max_new_tokens),
                                   seed=int(seed or 0))
    a, b = bench.base_answers([prompt.strip()] * 2, sampling)
    for n, temperature in enumerate(HOTTER, 1):
        if a != b:
            break  # a seed of its own too: the first's random draws at another temperature pick the same tokens
        b, = bench.base_answers([prompt.strip()], dataclasses.replace(sampling, temperature=temperature,
                                                                      seed=sampling.seed + n))
    return a, b


def game_status(game: dict | None) -> str:
    if not game:
        return "Type any prompt and ask for two answers, or start a game of ten prompts."
    done = len(game["pairs"])
    if done >= len(game["prompts"]):
        return (f"**{done} pairs collected.** Train on them: the run uses the Train tab's settings, and your pairs "
                "become the dataset.")
    return f"Prompt {done + 1} of {len(game['prompts'])}: pick the better answer, or write a better one."


def start_game(bench: Workbench, limits: Limits, answers: space.RateLimit, visitor, seed=0):
    game = {"prompts": game_prompts(int(seed or 0)), "pairs": []}
    a, b = two_answers(bench, limits, answers, visitor, game["prompts"][0], seed)
    return game, game["prompts"][0], a, b, "", game_status(game)


def pick(bench: Workbench, limits: Limits, answers: space.RateLimit, visitor, rows, game, prompt, a, b, choice, own,
         seed=0):
    """The visitor's judgement becomes a pair: the picked answer chosen and the other rejected, or their own answer
    chosen over the first sample. Outside a game the pair joins the dataset at once; in a game it is kept for the run
    the game ends in. Then the game's next prompt, answered twice."""
    if choice not in ("a", "b", "own"):
        raise DPOSpaceError(f"choice: a, b or own, got {choice!r}")
    chosen, rejected = {"a": (a, b), "b": (b, a), "own": ((own or "").strip(), a)}[choice]
    if choice == "own" and not chosen:
        raise DPOSpaceError("Write your own answer first.")
    pair = data.validate_rows([{"prompt": (prompt or "").strip(), "chosen": chosen, "rejected": rejected}],
                              source="your pick").rows[0]  # an empty prompt or identical answers: said, not added
    if game:
        game = {**game, "pairs": game["pairs"] + [pair]}
        if len(game["pairs"]) < len(game["prompts"]):
            following = game["prompts"][len(game["pairs"])]
            na, nb = two_answers(bench, limits, answers, visitor, following, seed)
            return gr.update(), gr.update(), gr.update(), game, following, na, nb, "", game_status(game)
        return gr.update(), gr.update(), gr.update(), game, "", "", "", "", game_status(game)
    pairs = data.validate_rows(list(rows or []) + [pair], source="dataset")
    note = f"Added: 「{pair['prompt']}」 → chosen {'your answer' if choice == 'own' else choice.upper()}"
    return pairs.rows, rows_to_frame(pairs.rows), f"{note} · {describe(pairs)}", game, prompt, a, b, "", \
        game_status(game)


def train_on_game(bench: Workbench, limits: Limits, runs: space.RateLimit, visitor, game, model, max_pairs, probe,
                  *values):
    """The end of a game: its pairs become the dataset, and a run starts on them with the Train tab's settings."""
    pairs = (game or {}).get("pairs", [])
    if not game or len(pairs) < len(game["prompts"]):
        raise DPOSpaceError(f"Finish the game first: {len(pairs)} of {GAME_LENGTH} prompts judged.")
    checked = data.validate_rows(pairs, source="your pairs")
    head = (checked.rows, rows_to_frame(checked.rows), "Your game's pairs: " + describe(checked))
    for status, timer in start_run(bench, limits, runs, visitor, checked.rows, model, max_pairs, probe, *values):
        yield (*head, status, timer)


def model_choices(hardware: models.Hardware) -> list[tuple[str, str]]:
    out = []
    for key, preset in models.PRESETS.items():
        label = preset.label
        if preset.needs_gpu and hardware.device == "cpu":
            label += " — needs a GPU"
        out.append((label, key))
    return out


def gpu_memory_gib(hardware: models.Hardware) -> float | None:
    if hardware.device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory / memory.GIB


def memory_check(hardware: models.Hardware, model: str, settings: training.RunSettings) -> tuple[str, str | None]:
    """(Markdown for the Train tab, warning or None): the estimated peak GPU memory of these settings with the Space's
    chat copy beside the run, which of the usual GPUs hold both (or the run alone, chat paused while it trains), and on
    this machine's GPU a batch / accumulation / checkpointing that fits if it does not."""
    e = memory.settings_estimate(settings, model)
    alone = memory.settings_estimate(settings, model, with_chat_copy=False)
    if e is None:
        return "", None
    g = e.gib()

    def verdict(gib: float) -> str:
        return "fits" if e.total <= gib * memory.GIB else (
            "fits with chat paused" if alone.total <= gib * memory.GIB else "too small")

    fits = " · ".join(f"{name} {verdict(gib)}" for name, gib in memory.GPUS.items())
    text = (f"**Estimated peak GPU memory: {g['total']:.1f} GiB** (training copy: weights {g['weights']:.1f} · LoRA + "
            f"optimizer {g['lora']:.2f} · activations {g['activations']:.1f} · LM head {g['head']:.1f} · CUDA + slack "
            f"{g['overhead']:.1f}; chat copy {g['chat']:.1f}; gradient checkpointing "
            f"{'on' if settings.gradient_checkpointing else 'off'}) — {fits}")
    warning = None
    available = gpu_memory_gib(hardware)
    if available is not None and alone.total > available * memory.GIB:
        preset = models.PRESETS.get(model)
        p = memory.plan(memory.shape_for(preset.model_id if preset else model), available,
                        effective_batch=settings.per_device_train_batch_size * settings.gradient_accumulation_steps,
                        max_length=int(settings.max_length or 1024), load_in_4bit=settings.load_in_4bit,
                        lora_r=settings.lora_r, lora_targets=tuple(settings.lora_target_modules),
                        with_chat_copy=False)  # chat pauses for a run that only fits alone
        advice = (f"try per_device_train_batch_size {p.batch} × gradient_accumulation_steps {p.accumulation}"
                  + (" with gradient checkpointing" if p.checkpointing else "")) if p.fits else \
            "lower max_length or pick a smaller model"
        warning = (f"These settings need about {alone.gib()['total']:.1f} GiB and this GPU has {available:.1f} GiB: "
                   f"the run would likely stop with an out-of-memory error; {advice}.")
        text += f"\n\n**Warning:** {warning}"
    elif available is not None and e.total > available * memory.GIB:
        text += f"\n\n**Note:** {gpu.SHARED_BASE}"
    return text, warning


def start_run(bench: Workbench, limits: Limits, runs: space.RateLimit, visitor, rows, model, max_pairs, probe,
              *values):
    """Queue a run with the settings as shown, fitted into the caps here (each cap that applied is named). On ZeroGPU
    the run trains right here, inside this request, so that the visitor's own GPU quota pays for it; the page's timer
    follows it from disk meanwhile."""
    visitor = check_visitor(visitor)
    runs.check(visitor)
    space.check_model(model, bench.hardware, bench.model_id)
    if not rows:
        raise DPOSpaceError("No data: pick an example or upload a file in the Data tab.")
    settings = space.space_settings(model, settings_values(values))
    settings.check()
    fitted = space.fit_run(settings, len(rows), limits, int(max_pairs or 0) or None)
    _, warning = memory_check(bench.hardware, model, fitted.settings)
    if warning:
        gr.Warning(warning)
    pairs = data.validate_rows(rows[: fitted.pairs], source="dataset")
    job = bench.submit(visitor, fitted.settings, pairs, probe=probe or None)  # the probe answers about ten times
    status = f"queued ({job.id}): {fitted.pairs} pairs, {fitted.steps} steps" + "".join(
        f" · {note}" for note in fitted.notes)
    yield status, gr.Timer(active=True)
    if bench.inline:
        bench.run(job)
        yield f"{job.status}: {job.message}", gr.Timer(active=True)  # one more tick draws the end


def stop_run(bench: Workbench, visitor):
    return "stopping after this step…" if bench.stop(check_visitor(visitor)) else "nothing to stop"


def run_label(settings: training.RunSettings, run_id: str) -> str:
    """A run as a visitor tells their runs apart: when it started, and the settings recipes change."""
    when = f"{run_id[9:11]}:{run_id[11:13]}:{run_id[13:15]}" if len(run_id) >= 15 else run_id
    loss = "+".join(settings.loss_type)
    if settings.f_divergence_type == "alpha_divergence":
        loss += f" · α-div {settings.f_alpha_divergence_coef:g}"
    elif settings.f_divergence_type != "reverse_kl":
        loss += f" · {settings.f_divergence_type}"
    return (f"{when} · β {settings.beta:g} · {settings.num_train_epochs:g} ep · {loss} · lr {settings.learning_rate:g}"
            f" · r {settings.lora_r}")


def run_choices(bench: Workbench, visitor) -> list[tuple[str, str]]:
    """(label, run id) of the visitor's runs on disk, newest first."""
    try:
        runs = bench.runs(check_visitor(visitor))
    except DPOSpaceError:
        return []
    out = []
    for run in reversed(runs):
        try:
            out.append((finished_run(run)[0], run.name))
        except Exception:  # noqa: BLE001 - an unreadable old run is left out, never a crash of the page
            continue
    return out


def finished_run(run_dir: Path) -> tuple[str, list[dict]]:
    """A finished run's label and logged metrics. A finished run's files never change, so they are read once per
    folder (the status tick asks for them every second while another run trains), not on every tick."""
    return _finished_run(str(run_dir), (run_dir / "run.yaml").stat().st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _finished_run(run_dir: str, stamp: int) -> tuple[str, list[dict]]:
    run_dir = Path(run_dir)
    return run_label(Workbench.settings_of(run_dir), run_dir.name), training.read_metrics(run_dir)


# The earlier runs a chart overlays, newest first, by the names its legend keeps (the status says which run is which)
EARLIER_SLOTS = ("run −1", "run −2")


def run_labels(bench: Workbench, visitor) -> dict[str, str]:
    """Run id → its label, for the visitor's runs on disk."""
    return {run_id: label for label, run_id in run_choices(bench, visitor)}


def run_status(bench: Workbench, visitor):
    """What the Train tab shows on each tick while a run is queued or running (the timer stops with the run): status
    line, charts, the probe's answers, downloads."""
    empty = pd.DataFrame(columns=["step", "value", "series"])
    job = bench.job(visitor) if visitor else None
    if job is None:
        return ("No run yet.", empty, empty, empty, empty, pd.DataFrame(columns=["step", "answer"]), None, None, "",
                empty, gr.Timer(active=False))
    # the run's state read once: the trainer thread changes it meanwhile, and a tick that drew "running" with the timer
    # stopped (it had read "done" further down) left the page at its last step for good
    state = job.status
    metrics = job.metrics()
    last = metrics[-1] if metrics else {}
    ran = space.describe_run(job.settings, bench.hardware, job.output_dir)
    if state == "queued":
        status = f"waiting: position {bench.position(job)} in line (one training at a time)"
    elif state == "running":
        step, total = int(last.get("step", 0)), int(last.get("max_steps", 0))
        eta = f" · ETA {last['elapsed'] / step * (total - step):.0f}s" if step and total else ""
        status = f"running: step {step}/{total or '?'}{eta}"
        if last:
            status += f" · loss {last.get('loss', float('nan')):.4f} · margin {last.get('rewards/margins', 0):.3f}"
        status += f" · {ran}"
    else:
        status = f"{state}: {job.message} · {ran}"
    displaced = training.likelihood_displacement(metrics)
    if displaced:
        status += f"\n\n**Warning — {displaced}**"

    # the visitor's two newest earlier runs still on disk, overlaid on every chart: recipes side by side
    earlier = [(slot, label, finished_run(bench.root / visitor / run_id)[1]) for slot, (label, run_id) in
               zip(EARLIER_SLOTS, [c for c in run_choices(bench, visitor) if c[1] != job.id], strict=False)]
    if earlier:
        status += "\n\nOverlaid: " + " · ".join(f"**{slot}** = {label}" for slot, label, _ in earlier)

    def series(*names):
        rows = [{"step": m["step"], "value": m[n], "series": n} for m in metrics for n in names if n in m]
        rows += [{"step": m["step"], "value": m[n], "series": f"{slot} · {n}"} for slot, _, old in earlier
                 for m in old for n in names if n in m]
        if not rows:
            return empty
        # every series a chart can hold is named from its first point on, empty (null) or not: Gradio's plot fixes
        # its colour domain when first drawn, and a series that joined later would never be drawn
        named = {r["series"] for r in rows}
        rows += [{"step": rows[0]["step"], "value": None, "series": name} for name in
                 [*names, *(f"{slot} · {n}" for slot in EARLIER_SLOTS for n in names)] if name not in named]
        return pd.DataFrame(rows, columns=["step", "value", "series"])

    samples = pd.DataFrame([{"step": s["step"], "answer": s["answer"]} for s in job.samples()],
                           columns=["step", "answer"])
    adapter_zip = yaml_file = command = None
    if state in ("done", "stopped") and job.output_dir.exists():
        adapter_zip, yaml_file, command = space.run_downloads(job.output_dir)
        if job.settings.report_to == "trackio":  # the run's dashboard, local-first
            command = (f"# this run's metrics in trackio (project {training.TRACKIO_PROJECT}, run {job.id}):\n"
                       f"trackio show --project {training.TRACKIO_PROJECT}\n\n{command}")
    loss = gr.LinePlot(value=series("loss"), caption=loss_caption(job.settings.loss_type))
    return (status, loss, series("rewards/margins"), series("rewards/accuracies"),
            series("rewards/chosen", "rewards/rejected"), samples, adapter_zip, yaml_file, command or "",
            series("logps/chosen", "logps/rejected"), gr.Timer(active=state in ACTIVE))


def push_adapter(bench: Workbench, visitor, token: str, repo_id: str):
    """Upload the visitor's adapter with their token. The token is used for this call only: never logged or saved."""
    job = bench.job(check_visitor(visitor))
    if job is None or job.status not in ("done", "stopped"):
        return "Train a model first."
    return space.push_adapter(job.output_dir, token, repo_id)


def sampling_from(temperature, top_p, max_new_tokens, seed, system_prompt, limits: Limits) -> generation.Sampling:
    if int(max_new_tokens) > limits.max_new_tokens:
        raise DPOSpaceError(f"max_new_tokens: at most {limits.max_new_tokens} new tokens per answer here.")
    return generation.Sampling(temperature=float(temperature), top_p=float(top_p),
                               max_new_tokens=int(max_new_tokens), seed=int(seed),
                               system_prompt=system_prompt or None)


def measures_markdown(text: str, reward: float | None) -> str:
    m = collapse.measure(text)
    parts = [f"refusal **{'yes' if m.refusal else 'no'}**", f"distinct-2 {m.distinct_2:.2f}",
             f"repetition {m.repetition:.2f}", f"{m.length} chars"]
    if reward is not None:
        parts.append(f"implicit reward {reward:+.2f}")
    return " · ".join(parts)


def compare(bench: Workbench, limits: Limits, answers: space.RateLimit, visitor, prompt, base_history, dpo_history,
            temperature, top_p, max_new_tokens, seed, system_prompt, run_ids=(), second_history=None):
    """Stream the base answer, then the DPO answers (the visitor's latest run, or the one or two runs picked), to the
    same prompt with the same seed; each column keeps its own conversation, and each answer's implicit reward is
    scored in its own conversation under its own run's β."""
    visitor = check_visitor(visitor)
    answers.check(visitor)
    if not prompt or not prompt.strip():
        raise DPOSpaceError("Type a prompt first.")
    run_ids = list(run_ids or [])
    if len(run_ids) > 2:
        raise DPOSpaceError("Pick at most two runs to compare with the base model.")
    sampling = sampling_from(temperature, top_p, max_new_tokens, seed, system_prompt, limits)
    has_dpo = bool(run_ids) or bench.run_dir(visitor) is not None
    columns = {"base": (None, base_history), "dpo": (run_ids[0] if run_ids else None, dpo_history)}
    if len(run_ids) == 2:
        columns["second"] = (run_ids[1], second_history)
    histories = {side: list(history or []) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
                 for side, (_, history) in columns.items()}

    def shown_now(*measures):
        measures = list(measures) + [""] * (3 - len(measures))
        return (histories["base"], histories["dpo"], "", measures[0], measures[1],
                histories.get("second", list(second_history or [])), measures[2])

    for side, (run_id, _) in columns.items():
        history = histories[side]
        if side == "dpo" and not has_dpo:
            job = bench.job(visitor)
            history[-1]["content"] = f"({job.message})" if job is not None and job.status == "evicted" else \
                "(no DPO model yet: train one in the Train tab)"
            break
        for text in bench.answer(visitor, history[:-1], sampling, dpo=side != "base", run_id=run_id):
            history[-1]["content"] = text
            yield shown_now()
    # each answer's implicit reward, in its own conversation: the base's and the first run's under the first run,
    # the second run's under its own (and its own β)
    labels = run_labels(bench, visitor) if run_ids else {}
    first = [(histories[side][:-1], histories[side][-1]["content"]) for side in ("base", "dpo")]
    rewards = bench.rewards(visitor, first, sampling.system_prompt, columns["dpo"][0]) if has_dpo else [None, None]
    measures = [measures_markdown(first[0][1], rewards[0])]
    if has_dpo:
        label = labels.get(columns["dpo"][0])
        measures.append((f"**{label}** · " if label else "") + measures_markdown(first[1][1], rewards[1]))
    else:
        measures.append("")
    if "second" in columns:
        run_id = columns["second"][0]
        answer = histories["second"][-1]["content"]
        reward, = bench.rewards(visitor, [(histories["second"][:-1], answer)], sampling.system_prompt, run_id)
        measures.append(f"**{labels.get(run_id, run_id)}** · " + measures_markdown(answer, reward))
    yield shown_now(*measures)


# the bars of the Evaluate chart: shares and 0–1 scores, where a collapse shows as refusal and Self-BLEU up, EAD down
SUMMARY_MEASURES = ("refusal_rate", "ead_2", "self_bleu", "sample_self_bleu", "repetition_across")


def summary_markdown(summary: dict, measures: dict) -> str:
    """One line per model: the text measures over the set, then K-sample diversity, entropy and the KL estimate."""
    k = measures.get("k", 0)
    lines = []
    for side, s in summary.items():
        line = (f"- **{side}**: refusal {s['refusal_rate']:.0%} · distinct-2 {s['distinct_2']:.2f} · EAD-2 "
                f"{s['ead_2']:.2f} · Self-BLEU {s['self_bleu']:.2f} · repetition {s['repetition']:.2f} (within answers)"
                f" / {s['repetition_across']:.2f} (across answers) · mean length {s['mean_length']:.0f} · top-"
                f"{measures.get('top_k', 10)} entropy {s['entropy']:.2f} nats")
        if k:
            line += (f" · over {k} samples of each of {measures['diversity_prompts']} prompts: EAD-2 "
                     f"{s['sample_ead_2']:.2f}, Self-BLEU {s['sample_self_bleu']:.2f}")
            if side != "base":
                line += f" · KL estimate {s['kl']:.1f} nats"
        lines.append(line)
    return "\n".join(lines)


def evaluate(bench: Workbench, limits: Limits, answers: space.RateLimit, visitor, prompts_text, temperature, top_p,
             max_new_tokens, seed, system_prompt, run_ids=(), k=gpu.EVAL_K, progress=gr.Progress(track_tqdm=True)):
    visitor = check_visitor(visitor)
    answers.check(visitor)
    prompts = [p.strip() for p in (prompts_text or "").split("\n") if p.strip()]
    if not prompts:
        prompts = data.read_prompts(EXAMPLES / "wakarimasen_eval.json")
    capped = len(prompts) > limits.eval_prompts
    prompts = prompts[: limits.eval_prompts]
    run_ids = list(run_ids or [])
    if len(run_ids) > 2:
        raise DPOSpaceError("Pick at most two runs to evaluate beside the base model.")
    sampling = sampling_from(temperature, top_p, max_new_tokens, seed, system_prompt, limits)
    k = int(k or 0)
    if not 0 <= k <= limits.eval_samples:
        raise DPOSpaceError(f"samples per prompt (K): between 0 and {limits.eval_samples} here, got {k}")
    report = bench.evaluate(visitor, prompts, sampling, run_ids or None, k)
    # every model by the name a visitor knows it by: "dpo" for their latest run, else the picked runs' labels
    labels = run_labels(bench, visitor)
    names = {"base": "base", "dpo": labels.get(run_ids[0], run_ids[0]) if run_ids else "dpo"}
    names |= {run_id: labels.get(run_id, run_id) for run_id in run_ids[1:]}

    def answers_of(row):
        return {"base": (row["base"], row["base_measures"]), "dpo": (row["dpo"], row["dpo_measures"]),
                **{side: (o["answer"], o["measures"]) for side, o in row["others"].items()}}

    def table_row(row):
        each = answers_of(row)
        out = {"prompt": row["prompt"], **{names[side]: answer for side, (answer, _) in each.items()}}
        out[f"refusal ({' / '.join(names.values())})"] = " / ".join("yes" if m["refusal"] else "no"
                                                                   for _, m in each.values())
        out[f"repetition ({' / '.join(names.values())})"] = " / ".join(f"{m['repetition']:.2f}"
                                                                      for _, m in each.values())
        return out

    table = pd.DataFrame([table_row(r) for r in report["rows"]])
    summary = {names[side]: s for side, s in report["summary"].items()}
    # one bar per measure and model, side by side (a shared x would stack them, which reads as a sum)
    bars = [f"{k} · {name}" for k in SUMMARY_MEASURES for name in summary]
    chart = pd.DataFrame([{"bar": f"{k} · {name}", "value": float(summary[name][k]), "model": name}
                          for k in SUMMARY_MEASURES for name in summary])
    text = summary_markdown(summary, report.get("measures", {}))
    if capped:
        text += f"\n\n(the first {limits.eval_prompts} prompts: the cap here)"
    return table, text, gr.BarPlot(value=chart, sort=bars), frame_to_csv(table, "evaluation.csv")


def inspect_pairs(bench: Workbench, limits: Limits, answers: space.RateLimit, visitor, rows,
                  progress=gr.Progress(track_tqdm=True)):
    """Per pair, the DPO model's log-probs and implicit rewards, formatted as the run trained them (its system
    prompt, its β)."""
    visitor = check_visitor(visitor)
    answers.check(visitor)
    if not rows:
        raise DPOSpaceError("No data loaded.")
    capped = len(rows) > limits.inspect_pairs
    rows = rows[: limits.inspect_pairs]
    report = bench.pair_report(visitor, rows)
    table = pd.DataFrame(report).round(3)
    right = sum(r["ranked_right"] for r in report) / len(report)
    cap = f" (the first {limits.inspect_pairs}: the cap here)" if capped else ""
    return table, f"The DPO model ranks **{right:.0%}** of {len(report)} pairs right{cap} (wrong ones first).", \
        frame_to_csv(table, "pairs.csv")


def frame_to_csv(frame: pd.DataFrame, name: str) -> str:
    path = Path(tempfile.mkdtemp(prefix="dpo-space-")) / name
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, quoting=csv.QUOTE_MINIMAL)
    path.write_text(buffer.getvalue(), encoding="utf-8-sig")  # with a BOM so Excel reads Japanese right
    return str(path)


def build_app(bench: Workbench | None = None, *, shared: bool | None = None) -> gr.Blocks:
    if bench is None:
        hardware = models.detect_hardware()
        bench = Workbench(os.environ.get("DPO_SPACE_MODEL") or models.default_model(hardware),
                          os.environ.get("DPO_SPACE_ROOT", "outputs/space"), hardware=hardware)
    limits = Limits.for_space(shared)
    runs = space.RateLimit(limits.runs_per_hour, 3600, "runs")
    answers = space.RateLimit(limits.answers_per_minute, 60, "answers (Compare, Evaluate, Inspect)")
    default_model = getattr(models.preset_for(bench.model_id), "key", models.EMBEDDED)
    defaults = dict(zip(SETTINGS, widget_values(training.RunSettings.for_model(default_model)), strict=True))

    # uploads and generated downloads (zips, CSVs) are removed after an hour, checked every hour
    with gr.Blocks(title="DPO Space", delete_cache=(3600, 3600)) as app:
        visitor = gr.BrowserState(None, storage_key="dpo_space_visitor")
        rows = gr.State([])
        gr.Markdown("# DPO Space")
        gr.Markdown(i18n("intro"))
        if limits.shared:
            gr.Markdown(i18n("shared"))

        with gr.Tab(i18n("data")):
            with gr.Row():
                example = gr.Dropdown(list(EXAMPLE_FILES), value=list(EXAMPLE_FILES)[0], label=i18n("example"))
                load = gr.Button(i18n("load_example"))
                upload = gr.File(label=i18n("upload"), file_types=[".json", ".jsonl"], type="filepath", elem_id="upload")
            report = gr.Markdown(elem_id="data-report")
            table = gr.Dataframe(headers=list(data.FIELDS), column_count=(3, "fixed"), interactive=True, wrap=True,
                                 max_height=420, column_widths=["30%", "35%", "35%"], label=i18n("rows"), elem_id="data-table")
            download = gr.DownloadButton(i18n("download"))
            with gr.Accordion(i18n("extreme"), open=False):
                extreme_prompts = gr.Textbox(lines=5, label=i18n("extreme_prompts"))
                extreme_chosen = gr.Textbox(data.SEED_REFUSAL, label=i18n("extreme_chosen"))
                extreme_build = gr.Button(i18n("extreme_build"))
            with gr.Accordion(i18n("collect"), open=False):
                game = gr.State(None)
                collect_status = gr.Markdown(game_status(None), elem_id="collect-status")
                with gr.Row():
                    collect_prompt = gr.Textbox(label=i18n("prompt"), scale=4, elem_id="collect-prompt")
                    collect_seed = gr.Number(0, label="seed", precision=0, scale=1)
                    two = gr.Button(i18n("two_answers"), elem_id="two-answers")
                    game_start = gr.Button(i18n("game"), elem_id="start-game")
                with gr.Row():
                    answer_a = gr.Textbox(label="A", lines=4, interactive=False, elem_id="answer-a")
                    answer_b = gr.Textbox(label="B", lines=4, interactive=False, elem_id="answer-b")
                with gr.Row():
                    pick_a = gr.Button(i18n("pick_a"), elem_id="pick-a")
                    pick_b = gr.Button(i18n("pick_b"), elem_id="pick-b")
                with gr.Row():
                    own = gr.Textbox(label=i18n("own_answer"), lines=2, scale=4)
                    pick_own = gr.Button(i18n("pick_own"))
                game_train = gr.Button(i18n("game_train"), variant="primary", elem_id="game-train")
            with gr.Accordion(i18n("token_audit"), open=False):
                audit_button = gr.Button(i18n("token_audit_run"))
                audit_report = gr.Markdown(elem_id="token-audit")

        with gr.Tab(i18n("train")):
            with gr.Row():
                model = gr.Dropdown(model_choices(bench.hardware), value=default_model, label=i18n("model"))
                recipe = gr.Dropdown([(v, k) for k, v in RECIPE_LABELS.items()],
                                     value=training.default_recipe(default_model), label=i18n("recipe"),
                                     info=i18n("recipe_info"), elem_id="recipe")
            widgets = {}
            with gr.Row():
                for name in UP_FRONT:
                    widgets[name] = setting_widget(name, defaults[name], epochs_cap=min(10, limits.max_epochs),
                                                   visible=is_shown(name, defaults))
            with gr.Accordion(i18n("advanced"), open=False):
                for start in range(0, len(ADVANCED), 4):
                    with gr.Row():
                        for name in ADVANCED[start : start + 4]:
                            widgets[name] = setting_widget(name, defaults[name], visible=is_shown(name, defaults))
                with gr.Row():
                    max_pairs = gr.Number(650, label=i18n("max_pairs"), precision=0)
                    probe = gr.Textbox(training.PROBE_PROMPT, label=i18n("probe"))
            settings_widgets = [widgets[name] for name in SETTINGS]
            memory_estimate = gr.Markdown(elem_id="memory-estimate")
            with gr.Row():
                start = gr.Button(i18n("start"), variant="primary", elem_id="start")
                stop = gr.Button(i18n("stop"), variant="stop")
            status = gr.Markdown("No run yet.", elem_id="run-status")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="value", color="series", title="loss",
                                        caption=loss_caption(["sigmoid"]), elem_id="loss-plot")
                margin_plot = gr.LinePlot(x="step", y="value", color="series", title="reward margin",
                                          caption=CHART_HELP["margin"])
            with gr.Row():
                accuracy_plot = gr.LinePlot(x="step", y="value", color="series", title="reward accuracy",
                                            caption=CHART_HELP["accuracy"], y_lim=[0, 1])
                rewards_plot = gr.LinePlot(x="step", y="value", color="series", title="rewards chosen / rejected",
                                           caption=CHART_HELP["rewards"])
            logps_plot = gr.LinePlot(x="step", y="value", color="series", title="log-probs chosen / rejected",
                                     caption=CHART_HELP["logps"], elem_id="logps-plot")
            samples = gr.Dataframe(headers=["step", "answer"], label=i18n("samples"), wrap=True, interactive=False)
            with gr.Row():
                adapter_zip = gr.File(label="adapter (zip)", interactive=False)
                run_yaml = gr.File(label="run.yaml", interactive=False)
            replay = gr.Code(label="replay on your own GPU", language="shell", interactive=False)
            with gr.Accordion(i18n("push"), open=False):
                token = gr.Textbox(type="password", label=i18n("token"))
                repo = gr.Textbox(label=i18n("repo"))
                push = gr.Button(i18n("push"))
                push_result = gr.Markdown()
            timer = gr.Timer(1.0, active=False)  # polls only while this visitor's run is queued or running

        with gr.Tab(i18n("compare")) as compare_tab:
            compare_runs = gr.Dropdown([], value=[], multiselect=True, max_choices=2, label=i18n("pick_runs"),
                                       info=i18n("pick_runs_info"), elem_id="compare-runs")
            with gr.Row():
                base_chat = gr.Chatbot(label=i18n("base"), height=380, elem_id="base-chat")
                dpo_chat = gr.Chatbot(label=i18n("dpo"), height=380, elem_id="dpo-chat")
                second_chat = gr.Chatbot(label=i18n("second_run"), height=380, visible=False, elem_id="second-chat")
            with gr.Row():
                base_measures = gr.Markdown(elem_id="base-measures")
                dpo_measures = gr.Markdown(elem_id="dpo-measures")
                second_measures = gr.Markdown(visible=False, elem_id="second-measures")
            with gr.Row():
                prompt = gr.Textbox(label=i18n("prompt"), scale=4, elem_id="compare-prompt")
                send = gr.Button(i18n("send"), variant="primary", elem_id="send")
                clear = gr.Button(i18n("clear"))
            gr.Examples(compare_examples(), [prompt], label=i18n("compare_examples"), examples_per_page=6,
                        api_name=False)  # its default api name, load_example, is the Data tab's
            with gr.Accordion(i18n("sampling"), open=False):
                with gr.Row():
                    temperature = gr.Slider(0, 1.5, value=0.6, step=0.05, label="temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top_p")
                    max_new = gr.Slider(16, limits.max_new_tokens, value=256, step=16, label="max_new_tokens")
                    sample_seed = gr.Number(0, label="seed", precision=0)
                chat_system = gr.Textbox(data.SEED_SYSTEM_PROMPT, label="system prompt")

        with gr.Tab(i18n("evaluate")) as evaluate_tab:
            eval_prompts = gr.Textbox(lines=4, label=i18n("eval_prompts"))
            with gr.Row():
                eval_runs = gr.Dropdown([], value=[], multiselect=True, max_choices=2, label=i18n("pick_runs"),
                                        info=i18n("pick_runs_info"), elem_id="eval-runs", scale=3)
                eval_k = gr.Slider(0, limits.eval_samples, value=min(gpu.EVAL_K, limits.eval_samples), step=1,
                                   label=i18n("eval_k"), info=i18n("eval_k_info"), scale=2)
            run_eval = gr.Button(i18n("run_eval"), variant="primary")
            eval_summary = gr.Markdown()
            eval_chart = gr.BarPlot(x="bar", y="value", color="model", title="base vs DPO", x_title="measure · model",
                                    x_label_angle=-30,  # "sample_self_bleu · base" and its neighbours overlap flat
                                    sort=[f"{k} · {side}" for k in SUMMARY_MEASURES for side in ("base", "dpo")],
                                    elem_id="eval-chart")
            eval_table = gr.Dataframe(wrap=True, interactive=False, max_height=520,
                                      column_widths=["18%", "31%", "31%", "10%", "10%"], elem_id="eval-table")
            eval_csv = gr.File(label="CSV", interactive=False)
            inspect = gr.Button(i18n("inspect"))
            inspect_summary = gr.Markdown()
            inspect_table = gr.Dataframe(interactive=False, headers=list(generation.PAIR_REPORT_COLUMNS))
            inspect_csv = gr.File(label="CSV", interactive=False)

        with gr.Tab(i18n("learn")):
            gr.Markdown(i18n("learn_text"), latex_delimiters=[{"left": "$$", "right": "$$", "display": True},
                                                 {"left": "$", "right": "$", "display": False}])

        # ---- wiring: every handler is a thin call into the engine
        def ensure_visitor(current):
            try:
                visitor_id = check_visitor(current)
            except DPOSpaceError:
                visitor_id = new_visitor_id()
            job = bench.job(visitor_id)
            return visitor_id, gr.Timer(active=job is not None)  # one tick shows a finished run; live ones keep going

        app.load(ensure_visitor, visitor, [visitor, timer], api_name="visitor")
        app.load(load_example, example, [rows, table, report], api_name=False)
        load.click(load_example, example, [rows, table, report], api_name="load_example")
        upload.upload(upload_file, [upload, rows], [rows, table, report], api_name="upload")
        table.input(apply_edits, [table, rows], [rows, report], api_name="edit")
        download.click(download_dataset, rows, download, api_name="download")
        extreme_build.click(shown(lambda p, c, progress=gr.Progress(track_tqdm=True):
                                  build_extreme(bench, limits, p, c, progress)),
                            [extreme_prompts, extreme_chosen], [rows, table, report], api_name="build_extreme")

        two.click(shown(lambda v, p, sd: two_answers(bench, limits, answers, v, p, sd)),
                  [visitor, collect_prompt, collect_seed], [answer_a, answer_b], api_name="two_answers")
        game_start.click(shown(lambda v, sd: start_game(bench, limits, answers, v, sd)), [visitor, collect_seed],
                         [game, collect_prompt, answer_a, answer_b, own, collect_status], api_name="start_game")
        pick_outputs = [rows, table, report, game, collect_prompt, answer_a, answer_b, own, collect_status]
        for button, choice in ((pick_a, "a"), (pick_b, "b"), (pick_own, "own")):
            button.click(shown(lambda v, r, g, p, a, b, o, sd, choice=choice:
                               pick(bench, limits, answers, v, r, g, p, a, b, choice, o, sd)),
                         [visitor, rows, game, collect_prompt, answer_a, answer_b, own, collect_seed], pick_outputs,
                         api_name=f"pick_{choice}")
        audit_button.click(shown(lambda r, m, n, sp: token_audit(bench, r, m, n, sp)),
                           [rows, model, widgets["max_length"], widgets["system_prompt"]], audit_report,
                           api_name="token_lengths")
        # a model starts from its own recipe (the embedded model's is χ², the others' the seed's): changing the model
        # sets the recipe and fills every setting itself (a recipe already shown fires no change of its own)
        model.change(model_values, model, [recipe, *settings_widgets], api_name=False)
        recipe.change(recipe_values, [model, recipe], settings_widgets, api_name=False)
        for name, (parent, shown_when) in SHOWN_WITH.items():
            widgets[parent].change(lambda value, shown_when=shown_when: gr.update(visible=shown_when(value)),
                                   widgets[parent], widgets[name], api_name=False)
        estimate_memory = shown(lambda model_key, *values: memory_check(
            bench.hardware, model_key, training.RunSettings.for_model(model_key, **settings_values(values)))[0])
        gr.on([app.load, model.change, *(w.change for w in settings_widgets)], estimate_memory,
              [model, *settings_widgets], memory_estimate, api_name="memory", show_progress="hidden")
        start.click(shown(lambda *a: (yield from start_run(bench, limits, runs, *a))),
                    [visitor, rows, model, max_pairs, probe, *settings_widgets], [status, timer], api_name="train")
        stop.click(shown(lambda v: stop_run(bench, v)), visitor, status, api_name="stop")
        game_train.click(shown(lambda *a: (yield from train_on_game(bench, limits, runs, *a))),
                         [visitor, game, model, max_pairs, probe, *settings_widgets],
                         [rows, table, report, status, timer], api_name="train_game")
        outputs = [status, loss_plot, margin_plot, accuracy_plot, rewards_plot, samples, adapter_zip, run_yaml, replay,
                   logps_plot, timer]
        timer.tick(shown(lambda v: run_status(bench, v)), visitor, outputs, api_name="status", show_progress="hidden")
        push.click(shown(lambda v, t, r: push_adapter(bench, v, t, r)), [visitor, token, repo], push_result,
                   api_name="push")

        sampling_inputs = [temperature, top_p, max_new, sample_seed, chat_system]
        for trigger, api_name in ((send.click, "compare"), (prompt.submit, False)):
            trigger(shown(lambda *a: (yield from compare(bench, limits, answers, *a))),
                    [visitor, prompt, base_chat, dpo_chat, *sampling_inputs, compare_runs, second_chat],
                    [base_chat, dpo_chat, prompt, base_measures, dpo_measures, second_chat, second_measures],
                    api_name=api_name)
        # the runs to pick from, read when the tab opens (not on every status tick: a page stays quiet)
        compare_tab.select(lambda v: gr.update(choices=run_choices(bench, v)), visitor, compare_runs, api_name="runs")
        evaluate_tab.select(lambda v: gr.update(choices=run_choices(bench, v)), visitor, eval_runs,
                            api_name="eval_runs")
        clear.click(lambda: ([], [], "", "", [], ""), None,
                    [base_chat, dpo_chat, base_measures, dpo_measures, second_chat, second_measures], api_name="clear")
        # two runs picked: a third column; each pick starts the conversations afresh (a column is one model's)
        compare_runs.change(lambda picked: (gr.update(visible=len(picked or []) == 2, value=[]),
                                            gr.update(visible=len(picked or []) == 2, value=""), [], [], "", ""),
                            compare_runs, [second_chat, second_measures, base_chat, dpo_chat, base_measures,
                                           dpo_measures], api_name=False)
        run_eval.click(shown(lambda *a, progress=gr.Progress(track_tqdm=True):
                             evaluate(bench, limits, answers, *a, progress=progress)),
                       [visitor, eval_prompts, *sampling_inputs, eval_runs, eval_k],
                       [eval_table, eval_summary, eval_chart, eval_csv],
                       api_name="evaluate")
        def health() -> str:  # for operators and bench/soak.py (gr.api reads the return type)
            holder = getattr(app, "state_holder", None)  # Gradio's sessions, bounded by Retention.sessions
            return json.dumps({**bench.health(), "sessions": len(holder.session_data) if holder else 0})

        gr.api(health, api_name="health")
        inspect.click(shown(lambda v, r, progress=gr.Progress(track_tqdm=True):
                            inspect_pairs(bench, limits, answers, v, r, progress)),
                      [visitor, rows], [inspect_table, inspect_summary, inspect_csv], api_name="inspect")
    # a bounded line: past QUEUE_MAX_SIZE waiting events a visitor is told the Space is busy instead of piling up
    app.queue(default_concurrency_limit=4, max_size=QUEUE_MAX_SIZE)
    return app


QUEUE_MAX_SIZE = 64


def launch(app: gr.Blocks, **kwargs):
    """`app.launch` with the UI's translations (Japanese by default, English by the browser's language), an upload
    size cap that Gradio applies before it stores a file, and a bound on the sessions whose state it keeps."""
    kwargs.setdefault("state_session_capacity", space.Retention.from_env().sessions)
    return app.launch(i18n=i18n, max_file_size=data.Limits().max_bytes, **kwargs)
