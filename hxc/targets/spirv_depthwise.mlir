// Applied before IREE's own pipeline to every Vulkan (SPIR-V) compile by hxc.targets.vulkan.
//
// IREE 3.13's SPIR-V code for linalg.depthwise_conv_2d_nchw_chw (every PyTorch/ONNX
// depthwise conv, conv1d included: groups == channels) is wrong. The named op iterates
// (n, oh, ow, c, kh, kw) while its output is indexed (n, c, oh, ow); the BaseDistribute
// pipeline then maps threads to the conv as (x, y) and to the fused zero-fill and bias
// add as (y, x) on one workgroup-memory tile, with no barrier between them (in a
// one-layer test lavapipe got only the first output column right; the rest held the bias
// alone). Interchanging the loops to the output's order (n, c, oh, ow, kh, kw) gives one
// distribution for all of them. Same arithmetic, same summation order: only the loop nest
// changes.
module attributes {transform.with_named_sequence} {
  transform.named_sequence @__transform_main(%root: !transform.any_op {transform.readonly}) {
    %convs = transform.structured.match ops{["linalg.depthwise_conv_2d_nchw_chw"]} in %root
      : (!transform.any_op) -> !transform.any_op
    transform.foreach %convs : !transform.any_op {
    ^bb0(%conv: !transform.any_op):
      %generic = transform.structured.generalize %conv : (!transform.any_op) -> !transform.any_op
      %reordered = transform.structured.interchange %generic iterator_interchange = [0, 3, 1, 2, 4, 5]
        : (!transform.any_op) -> !transform.any_op
    }
    transform.yield
  }
}
