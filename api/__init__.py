"""HTTP front end of the appliance (EC2 Query API and admin API); thin wrapper over :mod:`appliance`."""
