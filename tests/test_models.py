import torch

from gradwise.config import ModelConfig
from gradwise.nn import CNN1D, MLP, CharTransformer, build_model


def test_reference_mnist1d_cnn_has_the_papers_parameter_count():
    # Greydanus 2020: conv(1->25,k5) conv(25->25,k3) conv(25->25,k3), all stride 2, linear(125->10)
    model = CNN1D((40,), 10, [25, 25, 25], [5, 3, 3])
    expected = (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.randn(7, 40)).shape == (7, 10)


def test_cnn_accepts_channels_first_inputs():
    model = CNN1D((3, 32), 4, [8, 8], [3, 3])
    assert model(torch.randn(5, 3, 32)).shape == (5, 4)


def test_mlp_depth_width_activation():
    model = build_model(ModelConfig(name="mlp", depth=4, width=32, activation="tanh"), (8, 8), 10, "classification")
    assert isinstance(model, MLP) and len(model.blocks) == 3
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in linears] == [64, 32, 32, 32, 32]
    assert any(isinstance(m, torch.nn.Tanh) for m in model.modules())
    assert model(torch.randn(2, 8, 8)).shape == (2, 10)


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=20, context=16, n_layer=2, d_model=32, n_head=4).eval()
    idx = torch.randint(0, 20, (2, 16))
    out = model(idx)
    assert out.shape == (2, 16, 20)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 20
    out2 = model(changed)
    assert torch.allclose(out[:, :10], out2[:, :10], atol=1e-6)
    assert not torch.allclose(out[:, 10:], out2[:, 10:])


def reference_attention(attn, x):
    """Causal attention written out: bf16 projections, then scores, mask, softmax and the weighted sum in fp32."""
    b, t, c = x.shape
    d = c // attn.n_head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qkv = attn.qkv(x)
    q, k, v = (z.float().view(b, t, attn.n_head, d).transpose(1, 2) for z in qkv.split(c, dim=2))
    scores = (q @ k.transpose(-2, -1)) / d ** 0.5
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).to(torch.bfloat16).transpose(1, 2).reshape(b, t, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return attn.proj(y)


def test_attention_under_bf16_autocast_computes_in_fp32_on_cpu_and_runs_in_pure_half():
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=11, context=16, n_layer=1, d_model=32, n_head=4)
    attn = model.blocks[0].attn
    x = torch.randn(3, 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x)
    expected = reference_attention(attn, x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=0, atol=0)  # same roundings, same values
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and attn.qkv.weight.grad.dtype == torch.float32
    half = CharTransformer(vocab_size=11, context=16, n_layer=1, d_model=32, n_head=4).half()  # master_weights=fp16
    assert half(torch.randint(0, 11, (2, 16))).dtype == torch.float16
