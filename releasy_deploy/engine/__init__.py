"""The change engine: every rolling flow (deploy, rollback, restart) is a `plan.RollingPlan`
made by a pure planner, executed by one runner (`runner.RollingRunner`) with one recovery
path (`recovery`)."""
