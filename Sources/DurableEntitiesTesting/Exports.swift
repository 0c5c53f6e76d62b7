@_exported import DurableEntities
