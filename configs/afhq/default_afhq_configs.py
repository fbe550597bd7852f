"""AFHQ from an image folder (config.data.path), resized and centre-cropped to 64x64."""

from configs.image_folder import get_image_folder_config


def get_config():
    return get_image_folder_config("AFHQ", "data/afhq", size=64, channels=128, mult=(1, 2, 3, 4), attention=(2, 3))
