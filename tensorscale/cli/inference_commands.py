"""The commands that run a model: `gen` and `verify` (and the text `up --verify` prints).

They live apart from main.py because they need torch and transformers; everything is imported inside the
command bodies, so registering them keeps `tensorscale --help` and `desc` free of both.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager

import click

from .. import interrupts
from ..errors import TensorscaleError
from .options import model_input
from .revision import revision_option

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def run_options(func):
    """--dtype and --device: how gen and verify run the model (float32 on the CPU: the faithful reference)."""
    func = click.option(
        "--device",
        type=click.Choice(["cpu", "cuda", "mps"]),
        default="cpu",
        show_default=True,
        help="Where the model runs (cuda: an NVIDIA GPU, mps: Apple silicon).",
    )(func)
    return click.option(
        "--dtype",
        type=click.Choice(["float32", "bfloat16", "float16"]),
        default="float32",
        show_default=True,
        help="Compute dtype; bfloat16 halves the memory (a 7B in ~14 GB).",
    )(func)


@click.command()
@model_input("Model folder (with tokenizer files), or a Hugging Face hub id (org/name or org/name@rev).")
@click.option("--prompt", "-p", default="The capital of France is", show_default=True, help="Text to complete.")
@click.option("--chat", is_flag=True, help="Send the prompt as a user message through the model's chat template.")
@click.option("--system", default=None, metavar="TEXT", help="A system message before the prompt (implies --chat).")
@click.option("--n-predict", "-n", type=int, default=100, show_default=True, help="Tokens to generate (fewer at EOS).")
@click.option(
    "--temperature",
    type=float,
    default=None,
    metavar="T",
    help="Sampling temperature; 0 is greedy [default: generation_config.json's, else 0.8].",
)
@click.option(
    "--top-k",
    type=int,
    default=None,
    metavar="K",
    help="Sample from the k likeliest tokens, 0: all [default: generation_config.json's, else 40].",
)
@click.option(
    "--top-p",
    type=float,
    default=None,
    metavar="P",
    help="Nucleus sampling mass [default: generation_config.json's, else 0.9].",
)
@click.option(
    "--repeat-penalty",
    type=float,
    default=None,
    metavar="R",
    help="Repetition penalty, 1: none [default: generation_config.json's when sampling, else 1].",
)
@click.option(
    "--greedy",
    is_flag=True,
    help="Always take the likeliest token: pure arg-max (no penalty unless --repeat-penalty), deterministic.",
)
@click.option("--seed", type=int, default=None, help="Seed for sampling (default: a fresh one, reported).")
@run_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print {prompt, completion, tokens, settings (each with its origin), ...} as JSON instead of streaming.",
)
@revision_option
def gen(
    source,
    prompt,
    chat,
    system,
    n_predict,
    temperature,
    top_k,
    top_p,
    repeat_penalty,
    greedy,
    seed,
    dtype,
    device,
    as_json,
):
    """Complete a prompt with a model, streaming tokens as they are generated.

    \b
    Settings: a value given here wins; else sampling takes temperature, top-k,
    top-p and repetition penalty from the model's generation_config.json where
    it sets them, else the defaults above. --greedy (or --temperature 0) is
    pure arg-max. Nothing else in that file is used but its token ids.
    \b
    Examples:
      tensorscale gen examples/pydoc-llama -p "Return the" -n 30 --greedy
      tensorscale gen HuggingFaceTB/SmolLM2-135M-Instruct --chat -p "What is the capital of France?"
    """
    from ..gguf_import import runnable_source
    from ..inference.generate import Settings, generate
    from ..inference.loading import require_transformers

    settings = Settings(
        n_predict,
        temperature,
        top_k,
        top_p,
        greedy,
        seed,
        repeat_penalty,
        chat or system is not None,
        system,
        dtype,
        device,
    )
    settings.check()  # before the prompt is printed, so a bad option is the only output
    seed = settings.draw_seed()
    interrupted = "tensorscale: interrupted" + (
        f"; rerun with --seed {seed} to repeat this sample" if seed is not None else ""
    )

    def note(text):
        click.echo(f"tensorscale: note: {text}", err=True)

    with _interruptible(interrupted):
        require_transformers("gen")  # before a GGUF input is imported for it
        model = runnable_source(source)
        if as_json:
            click.echo(json.dumps(generate(model, source, prompt, settings, on_note=note), indent=2))
            return
        started = []

        def stream(text):
            if not started:
                if not settings.chat:  # a completion reads on from the prompt; a chat reply stands alone
                    click.echo(prompt, nl=False)
                started.append(True)
            click.echo(text, nl=False)
            sys.stdout.flush()

        result = generate(model, source, prompt, settings, on_text=stream, on_note=note)
        if not started and not settings.chat:
            click.echo(prompt, nl=False)
        click.echo()
    if seed is not None:
        click.echo(f"[{result['tokens']} tokens, seed {seed}]", err=True)


@contextmanager
def _interruptible(message: str):
    """Ctrl-C (or SIGTERM) while a model runs: say so in one line, exit 130. gen and verify write no files,
    so the "nothing was written" of the converting commands would only puzzle."""
    try:
        yield
    except KeyboardInterrupt:
        _exit_interrupted(message)
    except Exception:
        if interrupts.received():  # an import cut short by Ctrl-C fails on its retry: still an interrupt
            _exit_interrupted(message)
        raise


def _exit_interrupted(message: str):
    interrupts.hold()
    click.echo("", err=True)
    click.echo(message, err=True)
    sys.exit(EXIT_INTERRUPTED)


@click.command()
@click.argument("paths", nargs=-1, metavar="[SRC DST]")
@click.option("--input", "-i", "source", default=None, metavar="SRC", help="The reference model.")
@click.option(
    "--output", "-o", "output", default=None, metavar="DST", help="The model that should compute the same function."
)
@click.option(
    "--text",
    "text_path",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Compare on this text (one sequence per paragraph) instead of the built-in prompts.",
)
@click.option(
    "--tolerance",
    type=float,
    default=None,
    metavar="X",
    help="Pass mark on max|Δlogit| / max|logit|; exit status 1 beyond it "
    "[default: 1e-4 in float32, 1e-2 in float16, 5e-2 in bfloat16].",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the random token ids used when there is no tokenizer.",
)
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON for scripts.")
def verify(paths, source, output, text_path, tolerance, seed, dtype, device, as_json):
    """Prove two checkpoints compute the same function: run both on the same tokens and compare logits.

    \b
    Reports max|Δlogit| (absolute and relative to max|logit|), KL(SRC‖DST),
    top-1 agreement and each model's perplexity. Exit status 0 within
    --tolerance, 1 beyond it, 2 when the two cannot be compared.
    \b
    Examples:
      tensorscale verify ./tiny-llama ./tiny-llama-x2
      tensorscale verify -i ./tiny-llama -o ./tiny-llama-x2 --text notes.txt --json
    """
    from ..gguf_import import runnable_source
    from ..inference.loading import require_transformers
    from ..inference.verify import read_texts
    from ..inference.verify import verify as run_verify

    source, output = _two_models(paths, source, output)
    texts = read_texts(text_path) if text_path else None
    with _interruptible("tensorscale: interrupted"):
        require_transformers("verify")  # before a GGUF input is imported for it
        report = run_verify(
            runnable_source(source),
            runnable_source(output),
            source,
            output,
            texts=texts,
            tolerance=tolerance,
            seed=seed,
            dtype=dtype,
            device=device,
        )
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else verify_text(report))
    if not report.passed:
        sys.exit(EXIT_FAILED)


class UpVerification:
    """`up --verify`, arranged so that nothing is written for a check that cannot run or cannot pass.

    transformers is imported at once (before any work); once the plan is known, a 16-bit storage that
    rounds the function (the "not exact in bfloat16" note) sets the tolerance to what such rounding gives,
    unless --tolerance was chosen; then the check runs on the finished temporary folder, so the model card
    carries its numbers and an interrupt leaves OUT untouched."""

    def __init__(self, tolerance: float | None):
        from ..inference.loading import require_transformers

        require_transformers("up --verify")
        if tolerance is not None and not tolerance >= 0:
            raise TensorscaleError(f"--tolerance must be a number >= 0, got {tolerance}")
        self.tolerance = tolerance
        self.report = None
        self.plan = None

    def prepare(self, plan) -> str | None:
        """Fix the tolerance for `plan`; a note for the user when storage rounding changed it."""
        from ..inference.verify import STORAGE_TOLERANCE, default_tolerance
        from ..planning.plan import inexact_storage

        self.plan = plan
        rounding = inexact_storage(plan)
        if self.tolerance is not None:
            return None
        if rounding is None:
            self.tolerance = default_tolerance()
            return None
        self.tolerance = STORAGE_TOLERANCE[rounding]
        return (
            f"up --verify: {rounding} storage rounds this model's scaled weights (see the note), so its logits "
            f"can differ by ~1e-3 relative: checking against tolerance {self.tolerance:g} instead of "
            f"{default_tolerance():g}; pass --tolerance to choose, or --dtype float32 to keep it exact"
        )

    @property
    def expected_change(self) -> bool:
        """--duplicate-layers changes the function on purpose: verify measures the change, no failure."""
        return self.plan.depth is not None and not self.plan.depth.function_preserving

    def __call__(self, folder: str) -> dict:
        from ..gguf_import import runnable_source
        from ..inference.verify import verify as run_verify

        source = self.plan.source.folder
        report = run_verify(runnable_source(source), runnable_source(folder), source, folder, tolerance=self.tolerance)
        report.source = self.plan.source.label
        self.report = report
        return dict(report.to_dict(), expected_change=self.expected_change)

    def finish(self, output: str) -> None:
        self.report.output = output

    def text(self) -> str:
        text = verify_text(self.report)
        if self.expected_change:  # the verdict (the last line) does not apply: report the change instead
            report = self.report
            text = text.rsplit("\n", 1)[0] + (
                f"\nCHANGED, as expected (--duplicate-layers is not function-preserving): relative logit error "
                f"{report.relative_logit_error:.4g}, KL {report.kl_mean:.4g} nats, top-1 agreement "
                f"{report.top1_agreement:.2%}"
            )
        return text

    @property
    def failed(self) -> bool:
        return not self.report.passed and not self.expected_change


def _two_models(paths, source, output):
    if paths and (source or output):
        raise TensorscaleError("give the two models either as SRC DST or as --input/--output, not both")
    if paths:
        if len(paths) != 2:
            raise TensorscaleError(f"verify compares two models; got {len(paths)} path(s): tensorscale verify SRC DST")
        return paths
    if not source or not output:
        raise TensorscaleError("verify needs two models: tensorscale verify SRC DST (or --input SRC --output DST)")
    return source, output


def verify_text(report) -> str:
    """The verify report for people: numbers first, the verdict last."""

    def number(value):
        return "n/a" if value is None else f"{value:.4g}"

    verdict = "PASS" if report.passed else "FAIL"
    relation = "<=" if report.passed else ("is NaN, not <=" if math.isnan(report.relative_logit_error) else ">")
    lines = [
        f"verify {report.source} -> {report.output}",
        f"  inputs                 {report.inputs}; {report.positions} positions",
        f"  max |Δlogit|           {number(report.max_abs_logit_diff)}  (max |logit| {number(report.max_abs_logit)})",
        f"  relative logit error   {number(report.relative_logit_error)}",
        f"  KL(src ‖ dst)          {number(report.kl_mean)} nats per position",
        f"  top-1 agreement        {report.top1_agreement:.2%}",
        f"  perplexity             src {number(report.perplexity_source)}, dst {number(report.perplexity_output)}",
        f"{verdict}: relative logit error {number(report.relative_logit_error)} {relation} tolerance "
        f"{report.tolerance:g}"
        if not getattr(report, "nonfinite", None)
        else f"FAIL: {report.nonfinite}",
    ]
    return "\n".join(lines)
