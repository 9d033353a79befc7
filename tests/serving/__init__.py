"""Tests of the serving side: model config, model server, clients, promotion."""
