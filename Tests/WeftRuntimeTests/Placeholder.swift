import XCTest
final class PWeftRuntimeTests: XCTestCase { func testNothing() {} }
