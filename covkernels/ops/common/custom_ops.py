"""What every covkernels custom op shares: the backward ops are first-order only."""


def first_order_only(op):
    """Registers on a backward custom op an autograd formula that refuses to run: differentiating it (a
    double backward) raises a clear error instead of a wrong number."""

    def refuse(ctx, *grads):
        raise RuntimeError(f"covkernels: double backward through {op._qualname} is not supported (the gradients of "
                           "covkernels' functions are first-order only)")

    def no_context(ctx, inputs, output):
        pass

    op.register_autograd(refuse, setup_context=no_context)
