"""Distributed training: the process group and rank placement (``distributed``), DeepSpeed's
configs (``ds_config``), optimizer and schedule (``optim``), checkpoints and their layout
(``checkpoint``) and reading them back (``consolidate``, ``safe_load``), the EMA (``ema``),
validation and evaluation (``evaluation``), metrics, signals and the :class:`Trainer`.

May import ``config``, ``errors``, ``model``, ``data``, ``flops`` and ``tracking``; never a stage
module (``evaluate``, ``dryrun``, ``cli``).
"""
