"""The planner by stage family (issue 25): :mod:`memctl.planning.core` holds the plan's records and
shared helpers, :mod:`memctl.planning.context` the immutable context passed from family to family;
one module per family (data, curvature, masks with pruning, evaluation, report, vision) plans its
stages as a pure function of that context; :func:`memctl.plan.build_plan` composes them
(docs/architecture.md, "Planning")."""
