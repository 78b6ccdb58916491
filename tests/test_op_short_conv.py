"""The causal depthwise short convolution (gated DeltaNet's q/k/v mixing) against its tap loop."""
import pytest
import torch
import torch.nn.functional as F

from quasar_model.ops.short_conv import short_conv, short_conv_reference


def test_short_conv_matches_its_reference_in_one_go_by_steps_and_packed():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 11, 6, generator=g), torch.randn(6, 4, generator=g)
    y, state = short_conv(x, w, output_final_state=True)
    y_ref, state_ref = short_conv_reference(x, w, output_final_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state, x[:, -3:])                           # the last K-1 inputs
    torch.testing.assert_close(state_ref, x[:, -3:])
    # nn.Conv1d's causal form (transformers' causal_conv1d_fn): pad K-1 on both sides, keep the first T
    conv = F.conv1d(x.transpose(1, 2), w[:, None], padding=3, groups=6)[..., :11].transpose(1, 2)
    torch.testing.assert_close(y, conv)
    # a prefix, then single steps carrying the state
    y1, s = short_conv(x[:, :5], w, output_final_state=True)
    outs = [y1]
    for t in range(5, 11):
        o, s = short_conv(x[:, t:t + 1], w, s, output_final_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), y)
    # packed: two documents, each from zero history
    flat_x = x[:1]
    packed, _ = short_conv(flat_x, w, cu_seqlens=torch.tensor([0, 4, 11]))
    torch.testing.assert_close(packed[:, 4:], short_conv(flat_x[:, 4:], w)[0])
    torch.testing.assert_close(packed[:, :4], short_conv(flat_x[:, :4], w)[0])
    with pytest.raises(ValueError, match="weight must be"):
        short_conv(x, torch.randn(5, 4))
