from app import create_app
application = app = create_app()
