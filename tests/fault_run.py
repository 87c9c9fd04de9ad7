"""Run the ``stepdistill`` CLI in this process and send it a signal at a chosen point.

    python tests/fault_run.py KILL|TERM|INT step:N  distill RECIPE --output-dir OUT ...
    python tests/fault_run.py KILL export           distill RECIPE --output-dir OUT ...

``step:N``: right after the first role update of optimizer step N (0-based), so the process is
mid-step with some roles already updated in memory. ``export``: while the exported pipeline is
being written (its files saved, the model card not yet). The process signals itself, so the
point is exact; what follows (death, a checkpoint at the step boundary) is the real thing.
Exits with the CLI's status.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    signame, where, *cli_args = argv
    signum = getattr(signal, f"SIG{signame}")

    from stepdistill import export
    from stepdistill.cli import main as cli_main
    from stepdistill.training import trainer

    if where.startswith("step:"):
        kill_step = int(where.removeprefix("step:"))
        original = trainer.Trainer.step_role
        sent = []

        def step_role(self, name, loss, last_micro_step):
            original(self, name, loss, last_micro_step)
            step = self._current_step
            if step == kill_step and last_micro_step and not sent:
                sent.append(name)
                os.kill(os.getpid(), signum)

        original_train_step = trainer.Trainer.train_step

        def train_step(self, step):
            self._current_step = step
            return original_train_step(self, step)

        trainer.Trainer.step_role = step_role
        trainer.Trainer.train_step = train_step
    elif where == "export":
        original_card = export.write_model_card

        def write_model_card(*args, **kwargs):
            os.kill(os.getpid(), signum)
            return original_card(*args, **kwargs)

        export.write_model_card = write_model_card
    else:
        raise SystemExit(f"unknown point {where!r}")
    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
