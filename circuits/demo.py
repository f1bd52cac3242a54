"""`make demo`: load the bundled SmolLM2 and print its graph (the full discovery demo comes later)."""

from __future__ import annotations

import time

from .model import SMOLLM2, load_model


def main() -> None:
    start = time.perf_counter()
    model = load_model(SMOLLM2)
    seconds = time.perf_counter() - start
    graph = model.graph
    print(model)
    print(f"loaded in {seconds:.1f} s")
    print(graph)
    print(f"sources: {', '.join(graph.sources[:4])}, ..., {graph.sources[-1]}")
    print(f"destinations: {', '.join(graph.destinations[:3])}, ..., {graph.destinations[-1]}")
    print(f"edges: {graph.edges[0]}, {graph.edges[1]}, ..., {graph.edges[-1]}")


if __name__ == "__main__":
    main()
