"""Distributed training: the resolved run plan (``run_plan``), the process group and rank
placement (``distributed``), DeepSpeed's configs (``ds_config``), optimizer and schedule
(``optim``), checkpoints and their layout (``checkpoint``) and reading them back
(``consolidate``, ``safe_load``), the EMA (``ema``), distillation's teacher and loss
(``distill``), validation and evaluation (``evaluation``), cadence and the stop agreement
(``cadence``), metrics, RNG state, signals and the :class:`Trainer`.

May import ``config``, ``errors``, ``model``, ``data``, ``flops`` and ``tracking``; never a stage
module (``evaluate``, ``dryrun``, ``cli``).
"""
