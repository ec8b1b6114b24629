"""Using a trained model: predictions, the test-set report, adversarial attacks and their
transfer to other models, analyses.
"""
