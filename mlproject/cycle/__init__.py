"""The continuous-learning cycle as a library: what the orchestrator (``pipelines.orchestrate``) and
the walk-forward simulation (``pipelines.simulate``) run, over typed hand-offs.

- :mod:`mlproject.cycle.state`: the durable watermarks (:class:`~mlproject.cycle.state.CycleState`),
  what is due (:class:`~mlproject.cycle.state.Due`), the retrain window and the intake's history.
- :mod:`mlproject.cycle.production`: the Production model a retrain continues, and the plan it says.
- :mod:`mlproject.cycle.retrain`: train, evaluate and gate in one pass
  (:func:`~mlproject.cycle.retrain.train_evaluate_promote` -> :class:`~mlproject.cycle.retrain.Retrained`).
- :mod:`mlproject.cycle.simulate`: the walk-forward simulation.
- :mod:`mlproject.cycle.settle`: what a killed cycle left.
- :mod:`mlproject.cycle.summary`: the cycle's result and the summary a person reads.

The steps themselves are library functions too: ``mlproject.ingestion.ingest``,
``mlproject.training.train_policy``, ``mlproject.reporting.evaluate_models`` and
``mlproject.gate.promote_candidate``, the same functions the steps' command lines call.
"""
