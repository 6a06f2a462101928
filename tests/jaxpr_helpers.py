"""Counting equations of a jaxpr, nested ones included (scan bodies, remat, pjit, custom calls)."""


def count_equations(jaxpr, primitive_names: tuple[str, ...]) -> int:
  """Equations whose primitive is one of `primitive_names`, in `jaxpr` and every sub-jaxpr."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in primitive_names
    for param in eqn.params.values():
      for inner in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          count += count_equations(inner, primitive_names)
  return count
