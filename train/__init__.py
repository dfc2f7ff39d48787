"""moeforge training package: models, data, trainer."""
