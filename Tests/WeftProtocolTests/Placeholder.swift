import XCTest
final class PWeftProtocolTests: XCTestCase { func testNothing() {} }
