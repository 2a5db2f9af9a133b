"""Runs a runner's `main` inside the test process (no interpreter start, no jax import)."""

from __future__ import annotations


def run_perplexity_main(*args: str) -> int:
  """`experiments.perplexity`'s main in this process with flags `args` (restored
  after), as `python -m experiments.perplexity ARGS` runs it; returns its exit
  code. Only for runs that end before compiling anything (no compilation cache)."""
  from absl import flags
  from absl.testing import flagsaver

  from experiments import perplexity

  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["perplexity", *args, "--nocompilation_cache"])
    try:
      perplexity.main(["perplexity"])
    except SystemExit as e:
      return e.code
    finally:
      flags.FLAGS.unparse_flags()
  return 0
