"""MindIE compatibility: its service config import, rank tables and performance CSV."""
