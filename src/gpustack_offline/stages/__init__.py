"""Stages of the online side: locks, wheels, tools, images and registry, runners."""
