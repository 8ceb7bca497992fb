"""The recipe: one pydantic schema, validated whole before anything heavy is imported."""
