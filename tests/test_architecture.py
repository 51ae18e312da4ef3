"""The drawing of imports runs one way: no import circle, no import from a lower layer into a higher one
(tools/import_graph.py holds the layer order), models and losses independent of each other."""

from tools.import_graph import LAYERS, cycles, module_edges, unit_edges, unit_of, upward_imports


def test_no_import_cycle_and_no_upward_import():
    edges = module_edges()
    assert cycles(edges) == []
    assert cycles({u: v for u, v in unit_edges(edges).items() if u}) == []
    assert upward_imports(edges) == []


def test_every_subpackage_has_a_layer_and_models_and_losses_stay_apart():
    edges = module_edges()
    units = {unit_of(m) for m in edges if unit_of(m)}
    assert units == {u for layer in LAYERS for u in layer}
    graph = unit_edges(edges)
    assert "losses" not in graph["models"] and "models" not in graph["losses"]
    assert graph["losses"] == set()  # pure functions on arrays


def test_the_checker_finds_a_circle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    up = upward_imports({"jaxpost.models.lm": {"jaxpost.train.step"}})
    assert up == [("jaxpost.models.lm", "jaxpost.train.step")]
