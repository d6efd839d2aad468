"""Recipes, the stage registry, the runner, overrides, plans and gates."""
