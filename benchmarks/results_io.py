"""What every benchmark script records beside its figures, and where."""
import json
import os
import platform


def machine() -> dict:
    """The machine, with the 1-minute load average: other processes skew the figures."""
    return dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine(), load_average=os.getloadavg()[0])


def write(name: str, result: dict) -> str:
    """Prints `result` and writes it to benchmarks/results/`name`.json; returns the path."""
    print(json.dumps(result, indent=1))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return out
