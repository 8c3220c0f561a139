"""Planning with a world model as a library: objectives (objectives.py), the oracle (oracle.py), the
planner from its config, task sampling and the batched MPC run of the protocol (protocol.py), and
one reported evaluation (report.py). The eval verb and training's planning stage both call
`evaluate`; `python -m leworld.bench planning` times the same objective and planner."""

from leworld.planning.objectives import EncodedSimulatorObjective, Goals, LatentObjective, SimulatorObjective
from leworld.planning.oracle import Oracle
from leworld.planning.protocol import check_protocol, make_planner, run_protocol, sample_tasks, summary, task_episodes
from leworld.planning.report import evaluate, save_videos

__all__ = ["EncodedSimulatorObjective", "Goals", "LatentObjective", "Oracle", "SimulatorObjective", "check_protocol", "evaluate", "make_planner",
           "run_protocol", "sample_tasks", "save_videos", "summary", "task_episodes"]
