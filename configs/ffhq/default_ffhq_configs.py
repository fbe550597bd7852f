"""FFHQ from an image folder (config.data.path), resized and centre-cropped to 128x128."""

from configs.image_folder import get_image_folder_config


def get_config():
    return get_image_folder_config("FFHQ", "data/ffhq", size=128, channels=128, mult=(1, 2, 3, 4, 5), attention=(3, 4))
