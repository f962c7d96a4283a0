"""The 2D sin-cos table, the timestep embedder and the connector against MODEL.md 2.1 and 5.1."""

from __future__ import annotations

import math

import torch

from core.model.embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder, sincos_2d_table


def test_sincos_table_layout_and_values() -> None:
    grid, dim = 5, 16  # 4 frequencies per quarter
    table = sincos_2d_table(grid, dim)
    assert table.shape == (grid * grid, dim) and table.dtype == torch.float32
    omega = [10000 ** (-k / (dim / 4)) for k in range(dim // 4)]
    r, c = 3, 1
    row = table[r * grid + c]
    expected = (
        [math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
        + [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega]
    )
    torch.testing.assert_close(row, torch.tensor(expected, dtype=torch.float32))


def test_sincos_table_first_half_encodes_the_column() -> None:
    table = sincos_2d_table(4, 8)
    same_column = table[[0 * 4 + 2, 3 * 4 + 2]]
    same_row = table[[1 * 4 + 0, 1 * 4 + 3]]
    assert torch.equal(same_column[0, :4], same_column[1, :4])
    assert torch.equal(same_row[0, 4:], same_row[1, 4:])


def test_position_embedding_is_a_frozen_parameter_filled_with_the_table() -> None:
    emb = PositionEmbedding(6, 12)
    assert [name for name, _ in emb.named_parameters()] == ["pos_embed"]
    assert emb.pos_embed.shape == (36, 12) and not emb.pos_embed.requires_grad
    ids = torch.tensor([0, 7, 35])
    assert torch.equal(emb(ids), sincos_2d_table(6, 12)[ids])


def test_position_embedding_full_size_shapes_on_meta() -> None:
    with torch.device("meta"):
        vit, latent = PositionEmbedding(70, 3584), PositionEmbedding(64, 3584)
    assert vit.pos_embed.shape == (4900, 3584) and latent.pos_embed.shape == (4096, 3584)


def test_timestep_features_raw_time_cos_first() -> None:
    t = torch.tensor([0.0, 0.25, 1.0])
    feats = TimestepEmbedder.frequency_features(t, 256)
    assert feats.shape == (3, 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    torch.testing.assert_close(feats[1, :128], torch.cos(0.25 * freqs))
    torch.testing.assert_close(feats[1, 128:], torch.sin(0.25 * freqs))
    assert torch.equal(feats[0], torch.cat([torch.ones(128), torch.zeros(128)]))


def test_timestep_embedder_names_and_output() -> None:
    emb = TimestepEmbedder(32)
    assert {n: tuple(p.shape) for n, p in emb.named_parameters()} == {
        "mlp.0.weight": (32, 256), "mlp.0.bias": (32,), "mlp.2.weight": (32, 32), "mlp.2.bias": (32,),
    }
    t = torch.tensor([0.3, 0.7])
    feats = TimestepEmbedder.frequency_features(t, 256)
    expected = emb.mlp[2](torch.nn.functional.silu(emb.mlp[0](feats)))
    torch.testing.assert_close(emb(t), expected)


def test_connector_names_and_gelu_tanh() -> None:
    conn = MLPconnector(8, 16)
    assert sorted(n for n, _ in conn.named_parameters()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    x = torch.randn(3, 8)
    expected = conn.fc2(torch.nn.functional.gelu(conn.fc1(x), approximate="tanh"))
    torch.testing.assert_close(conn(x), expected)
