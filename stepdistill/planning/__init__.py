"""Memory planning for distillation recipes: will this run fit on my GPU, and if not, what is
the cheapest change that makes it fit?

Every network is built on the meta device from its config alone (a real SDXL / Flux / SD3
``config.json`` is enough, no weights); parameters are counted there (LoRA adapters through
peft's own injection), and activations are what autograd saves during one meta forward.

    from stepdistill.planning import RoleSpec, plan_report
    unet = json.load(open("sdxl/unet/config.json"))
    report = plan_report([
        RoleSpec("teacher", config=unet, param_dtype=torch.bfloat16),
        RoleSpec("generator", config=unet, trainable="full", param_dtype=torch.bfloat16, ema=True),
        RoleSpec("fake_score", config=unet, trainable="full", param_dtype=torch.bfloat16),
    ], batch_size=2, height=1024)
    print(report)

Modules: :mod:`.roles` (RoleSpec, meta building, parameter counts), :mod:`.activations`
(saved-tensor measurement, example inputs), :mod:`.estimate` (the memory model),
:mod:`.report` (verdicts and levers), :mod:`.rss` (a real CPU step's peak RSS, to check the
estimate against).
"""

from .activations import ActivationProfile, example_inputs, measure_activations
from .estimate import MemoryEstimate, Phase, RoleEstimate, Workload, estimate_memory, estimate_role
from .report import DEFAULT_HEADROOM, GPU_SIZES_GIB, Change, PlanReport, Verdict, plan_report
from .roles import ParameterCount, RoleSpec, build_on_meta, count_parameters

__all__ = [
    "ActivationProfile",
    "Change",
    "DEFAULT_HEADROOM",
    "GPU_SIZES_GIB",
    "MemoryEstimate",
    "ParameterCount",
    "Phase",
    "PlanReport",
    "RoleEstimate",
    "RoleSpec",
    "Verdict",
    "Workload",
    "build_on_meta",
    "count_parameters",
    "estimate_memory",
    "estimate_role",
    "example_inputs",
    "measure_activations",
    "plan_report",
]
